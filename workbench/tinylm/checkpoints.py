"""The tiny LM's checkpoint I/O: safetensors and JSON files of a series directory, no pickle.

    out_dir/tokens_<N>/           one Hugging Face checkpoint per token milestone
    out_dir/manifest.json         milestones, tokens, train and held-out loss
    out_dir/heldout.safetensors   the held-out rows (for perplexity)

Each checkpoint directory is a normal Hugging Face checkpoint (config.json, model.safetensors in
float32, generation_config.json, tokenizer files), so ``workbench.models.load_model(str(path))``
loads it through TransformerBridge. It is built in a temporary sibling and renamed into place
(``workbench.publish.publish_dir``), so a crash mid-save leaves no half-written checkpoint.

Exact-resume files: the newest checkpoint also holds ``optimizer.safetensors`` (AdamW state
and the torch RNG; older checkpoints drop it) and ``series_checkpoint.json`` (step, losses,
optimizer hyper-parameters, config, data fingerprint); no pickle. ``train_tiny_lm``
(``workbench.tinylm.train``) reads them back to continue a series exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from workbench.errors import first_line
from workbench.publish import publish_dir
from workbench.tinylm.config import SeriesError, TinyLMConfig
from workbench.tinylm.token_data import TokenData

MANIFEST = "manifest.json"
HELDOUT_FILE = "heldout.safetensors"
CHECKPOINT_JSON = "series_checkpoint.json"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINT_PREFIX = "tokens_"
FORMAT = "workbench-tiny-lm-series/1"


class Checkpoint(NamedTuple):
    path: Path
    """A Hugging Face checkpoint directory: ``load_model(str(path))`` loads it."""
    step: int
    """Optimizer steps taken."""
    tokens: int
    """Training tokens seen (step * batch_size * context)."""
    train_loss: float
    """Mean training CE (nats/token) over the steps since the previous checkpoint (an MoE's
    objective adds router_aux_loss_coef x the mean LB, recorded as ``router_aux_loss`` in the manifest)."""
    heldout_loss: float
    """Loss on the first cfg.eval_rows held-out rows (perplexity = exp of it)."""


def load_series(out_dir: str | Path) -> list[Checkpoint]:
    """The checkpoints recorded in ``out_dir/manifest.json``, oldest first."""
    manifest = read_manifest(out_dir)
    return [_as_checkpoint(Path(out_dir), rec) for rec in manifest["checkpoints"]]


def read_manifest(out_dir: str | Path) -> dict:
    """The series manifest: format, config, data (fingerprint, info), checkpoints, complete."""
    path = Path(out_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SeriesError(f"no readable series manifest at {path}: {first_line(err)}") from None


def load_heldout(out_dir: str | Path) -> torch.Tensor:
    """The series' held-out rows, (n_heldout, context) int64, each starting with BOS."""
    path = Path(out_dir) / HELDOUT_FILE
    try:
        return load_file(str(path))["heldout"].long()
    except (OSError, ValueError, KeyError) as err:
        raise SeriesError(f"no readable held-out rows at {path}: {first_line(err)}") from None


def _series_identity(cfg: TinyLMConfig, data: TokenData) -> dict:
    return {"config": cfg.to_dict(), "data_fingerprint": data.fingerprint}


def _check_series(out_dir: Path, cfg: TinyLMConfig, data: TokenData, existing: list[dict]) -> None:
    stored = None
    if existing:
        stored = existing[-1]["series"]
    elif (out_dir / MANIFEST).is_file():
        manifest = read_manifest(out_dir)
        stored = {"config": manifest.get("config"), "data_fingerprint": manifest.get("data", {}).get("fingerprint")}
    if stored is None:
        return
    want = json.loads(json.dumps(_series_identity(cfg, data)))
    if stored["config"] != want["config"]:
        diff = sorted(k for k in {*want["config"], *stored["config"]} if stored["config"].get(k) != want["config"].get(k))
        raise SeriesError(f"{out_dir} holds a series with another config (differs in {', '.join(diff)}); use another out_dir")
    if stored["data_fingerprint"] != want["data_fingerprint"]:
        raise SeriesError(f"{out_dir} holds a series trained on other token data; use another out_dir")


def _scan(out_dir: Path) -> list[dict]:
    """Records of the published checkpoints in out_dir, oldest first."""
    if not out_dir.is_dir():
        return []
    records = []
    for path in out_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        meta = path / CHECKPOINT_JSON
        if path.is_dir() and meta.is_file():
            try:
                records.append(json.loads(meta.read_text()))
            except ValueError as err:
                raise SeriesError(f"corrupted checkpoint record {meta}: {first_line(err)}") from None
    return sorted(records, key=lambda r: r["step"])


def _save_checkpoint(out_dir: Path, model, opt, data: TokenData, cfg: TinyLMConfig, record: dict, older: list[dict]) -> None:
    osd = opt.state_dict()
    meta = {**record, "series": json.loads(json.dumps(_series_identity(cfg, data))), "opt_param_groups": osd["param_groups"]}

    def build(tmp: Path) -> None:
        with _quiet_transformers():
            model.save_pretrained(str(tmp))
        data.tokenizer.save_pretrained(str(tmp))
        tensors = {"rng.torch": torch.get_rng_state()}
        for pid, state in osd["state"].items():
            for name, value in state.items():
                tensors[f"opt.{pid}.{name}"] = (value.detach().clone().contiguous() if isinstance(value, torch.Tensor)
                                                else torch.tensor(value))
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        (tmp / CHECKPOINT_JSON).write_text(json.dumps(meta, indent=2))

    out_dir.mkdir(parents=True, exist_ok=True)
    publish_dir(out_dir / record["path"], build, replace=True)
    for rec in older:  # only the newest checkpoint keeps the optimizer state
        (out_dir / rec["path"] / OPTIMIZER_FILE).unlink(missing_ok=True)


def _restore(path: Path, record: dict, model, opt) -> torch.Tensor:
    """Load weights and AdamW state from the newest checkpoint ``path``; returns the saved RNG state."""
    try:
        weights = _checkpoint_weights(path, model)
        tensors = load_file(str(path / OPTIMIZER_FILE))
    except (OSError, ValueError) as err:
        raise SeriesError(f"cannot resume from {path}: {first_line(err)}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise SeriesError(f"cannot resume from {path}: weights do not match the config "
                          f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": record["opt_param_groups"]})
    return tensors["rng.torch"]


def _checkpoint_weights(path: Path, model) -> dict[str, torch.Tensor]:
    """The weights saved in checkpoint ``path``, named as ``model``'s state dict.

    Dense: model.safetensors as it is. MoE: ``save_pretrained`` writes Mixtral's original
    per-expert layout (``block_sparse_moe.experts.<e>.w1/w2/w3``, the one every Mixtral loader
    reads), so the weights come back through transformers' own loader, which fuses them into the
    model's ``mlp.experts.gate_up_proj`` (E, 2·d_expert, d) and ``down_proj`` (E, d, d_expert) by
    copying (exact).
    """
    if model.config.model_type != "mixtral":
        return load_file(str(path / "model.safetensors"))
    with _quiet_transformers():
        loaded = type(model).from_pretrained(str(path), dtype=torch.float32)
    return loaded.state_dict()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _write_heldout(out_dir: Path, data: TokenData) -> None:
    path = out_dir / HELDOUT_FILE
    if path.is_file():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{HELDOUT_FILE}.tmp"
    save_file({"heldout": data.heldout.to(torch.int32)}, str(tmp))
    os.replace(tmp, path)


def _write_manifest(out_dir: Path, cfg: TinyLMConfig, data: TokenData, records: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ("path", "step", "tokens", "epochs", "lr", "train_loss", "heldout_loss", "elapsed_s")
    keys += ("router_aux_loss",) if cfg.is_moe else ()
    model = {"non_embedding_params": cfg.non_embedding_params, "mlp_width": cfg.mlp_width, "n_heads": cfg.n_heads,
             "total_steps": cfg.total_steps, "milestone_steps": list(cfg.milestone_steps)}
    if cfg.is_moe:
        model.update(architecture="MixtralForCausalLM", n_experts=cfg.n_experts, experts_per_token=cfg.experts_per_token,
                     active_non_embedding_params=cfg.active_non_embedding_params)
    manifest = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "model": model,
        "data": {"fingerprint": data.fingerprint, **data.info, "heldout_file": HELDOUT_FILE,
                 "epochs": cfg.total_steps * cfg.batch_size / len(data.train)},
        "checkpoints": [{k: rec[k] for k in keys} for rec in records],
        "complete": bool(records) and records[-1]["step"] >= cfg.total_steps,
    }
    _write_json_atomic(out_dir / MANIFEST, manifest)


def _as_checkpoint(out_dir: Path, record: dict) -> Checkpoint:
    return Checkpoint(out_dir / record["path"], record["step"], record["tokens"], record["train_loss"], record["heldout_loss"])


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-save progress bar for the block, then restore the caller's setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
