"""Small Llama-style language models trained offline on this CPU, for activation sparsity laws.

The sparsing law (Luo et al. 2024; docs/algorithms.md §4) measures how the activation ratio of a
model's MLP changes with the number of training tokens D, for ReLU and SiLU models and for
several width/depth ratios. Offline, the workbench trains such a series itself:

    corpus ──train_tokenizer──▶ byte-level BPE (vocab ~4096, deterministic)
           ──prepare_token_data──▶ BOS-prefixed rows of `context` tokens (data.chunk_and_tokenize);
                                   every `heldout_every`-th row is held out, training never sees it
           ──train_tiny_lm──▶ out_dir/tokens_<N>/   one Hugging Face checkpoint per token milestone
                              out_dir/manifest.json  milestones, tokens, train and held-out loss
                              out_dir/heldout.safetensors  the held-out rows (for perplexity)

The model is ``transformers.LlamaForCausalLM`` unchanged (wrapped, not reimplemented). Its
MLP is Llama's gated FFN, ``down(act(gate(x)) * up(x))``: activation ``relu`` makes it ReGLU
and ``silu`` makes it SwiGLU, the gated-FFN setting of the paper. With ReLU, ``act(gate(x))``
and the product with ``up(x)`` hold exact zeros; with SiLU they do not.

Mixture of experts (``n_experts > 0``): the model is ``transformers.MixtralForCausalLM`` with the
same attention, norms, rotary embedding, tokenizer and special ids, and each MLP replaced by E
gated experts of width ``mlp_width`` and a linear router. For the N = batch·context tokens of
layer l with router logits (N, E), p_l = softmax(logits), each token picks its top-k experts
S_l(x) and mixes their outputs with weights p_e / Σ_{S_l(x)} p. Training minimises

    loss = CE + router_aux_loss_coef · LB,      LB = (1/L) Σ_l E · Σ_e f_{l,e} · P_{l,e},
    f_{l,e} = (1/N) Σ_x [e ∈ S_l(x)],           P_{l,e} = (1/N) Σ_x p_{l,e}(x)

the Switch Transformer load-balancing loss (eqs. 4-6, top-k counting) of each MoE layer,
averaged over the L layers; Σ_e f_{l,e} = k, so balanced routing gives LB ≈ k and routing
collapsed onto k experts gives LB ≈ E. Each LB_l is transformers' own
``load_balancing_loss_func`` called on that one layer's logits. Called on all layers at once,
as ``MixtralForCausalLM`` does (``output.aux_loss``), that function pools f and P over layers
first, so opposite imbalances in two layers cancel and go unpenalised (transformers issues
#28255, #31464): at d_model 64, 3 layers, E 4, k 2, 200 steps, the pooled loss left layers with
up to 1.84x the balanced load (pooled LB 2.007, looking balanced); the per-layer mean kept every
layer within 1.18x at the same held-out loss. LB is computed in float32 from the upcast router
logits, outside autocast, so its top-k is the router's own choice. The recorded ``train_loss``
stays the CE (nats/token, comparable with the dense models and the held-out loss); the mean LB
is recorded beside it as ``router_aux_loss``. The held-out loss is plain CE.

Each checkpoint directory is a normal Hugging Face checkpoint (config.json, model.safetensors in
float32, generation_config.json, tokenizer files), so ``workbench.models.load_model(str(path))``
loads it through TransformerBridge.

Training: AdamW (fp32 master weights) with linear warm-up then cosine or linear decay, gradient
clipping, next-token cross-entropy computed in float32; the forward/backward runs under bf16
autocast on CPU by default (``dtype="fp32"`` turns autocast off). The rows are shuffled with a
seed per epoch; the batch of step s is a pure function of (seed, s), so the data position is
just the step count. When the series needs more tokens than the corpus has, it runs several
epochs (the manifest records how many).

Exact-resume contract: the newest checkpoint also holds ``optimizer.safetensors`` (AdamW state
and the torch RNG; older checkpoints drop it) and ``series_checkpoint.json`` (step, losses,
optimizer hyper-parameters, config, data fingerprint); no pickle. Re-running ``train_tiny_lm``
with the same config and data continues from the newest checkpoint and ends with the same
weights as an uninterrupted run (tested bit-for-bit in fp32; bf16 and torch.compile runs also
resumed bit-identically on this CPU); a finished series re-run does nothing and returns its
checkpoints. Training and the ``on_checkpoint`` callback each run on a forked torch RNG, so
neither changes the caller's RNG state nor each other's.

Speed (d_model 128, 4 layers, context 128, vocab 4096, batch 32, 2-core AMX CPU): bf16 is
1.4-2.4x faster than fp32. When other jobs share the CPU, torch's default two OpenMP threads
spin against them and drop to ~1-2k tokens/s; ``num_threads=1`` gives 5-9k (see
``train_tiny_lm``). On a quiet machine, two threads gave 12-15k tokens/s in bf16.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from workbench.errors import WorkbenchError

ACTIVATIONS: dict[str, str] = {
    "relu": "ReGLU: down(relu(gate x) * up x); exact zeros after the activation",
    "silu": "SwiGLU: down(silu(gate x) * up x); no exact zeros",
}
"""The single source of valid MLP activations (Llama ``hidden_act`` names) and what each gives."""

DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp32": None}
"""Training compute modes: the autocast dtype, or None for plain float32. Weights stay float32."""

ATTENTION = "eager"
"""Attention kernel while training (eager measured 10-20% faster than sdpa in bf16 on this CPU); not saved in config.json."""

EXPERTS = "grouped_mm"
"""transformers' expert kernel for MoE models while training (one grouped matmul per projection;
measured 1.55x the tokens/s of the "eager" per-expert loop in bf16 and about equal in fp32, d_model
128, 8 experts, top-2, one thread); not saved in config.json. It runs the expert matmuls in the
weights' float32 even under bf16 autocast (only attention, router and head run in bf16)."""

SCHEDULES = ("cosine", "linear")
"""Learning-rate decay shapes after warm-up."""

SPECIAL_TOKENS: dict[str, str] = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
"""The tokenizer's special tokens, with ids 0, 1, 2, 3 in this order."""

MANIFEST = "manifest.json"
HELDOUT_FILE = "heldout.safetensors"
CHECKPOINT_JSON = "series_checkpoint.json"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINT_PREFIX = "tokens_"
DATA_JSON = "token_data.json"
DATA_ROWS = "rows.safetensors"
TOKENIZER_SUBDIR = "tokenizer"
FORMAT = "workbench-tiny-lm-series/1"


class SeriesError(WorkbenchError):
    """A bad tiny-LM config, token data that does not fit it, or an out_dir holding another series."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


# ----------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class TinyLMConfig:
    """One small Llama-style model and how to train it; derived values are properties."""

    activation: str = "relu"
    """MLP activation, one of ACTIVATIONS: relu (gated FFN = ReGLU) or silu (SwiGLU)."""
    d_model: int = 128
    """Residual stream width; a multiple of head_dim."""
    n_layers: int = 4
    """Number of transformer blocks."""
    d_mlp: int | None = None
    """MLP neurons per layer; None -> 4 * d_model (see `mlp_width`). With experts: each expert's width."""
    n_experts: int = 0
    """0: dense Llama MLPs. E > 0: Mixtral MoE, E experts per layer, each a gated FFN of width
    mlp_width (Mixtral's convention: E x the dense MLP's parameters, k x its compute per token;
    set d_mlp = 4 * d_model // E for a parameter-matched fine-grained MoE)."""
    experts_per_token: int = 2
    """k, the experts each token is routed to (1 <= k <= n_experts); unused when dense."""
    router_aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss LB (per layer E * sum_e f_e * P_e, averaged over layers) in
    the MoE objective (0 turns it off; routing then tends to collapse onto a few experts); unused when dense."""
    head_dim: int = 32
    """Width of one attention head; n_heads = d_model // head_dim (full multi-head attention)."""
    context: int = 128
    """Tokens per training row, BOS included; also the model's max_position_embeddings."""
    vocab_size: int = 4096
    """Model vocabulary; the tokenizer must have at most this many tokens."""
    tie_embeddings: bool = True
    """Share the input embedding and the unembedding (as SmolLM2 does)."""
    batch_size: int = 32
    """Rows per optimizer step (batch_size * context tokens)."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    min_lr_fraction: float = 0.1
    """The learning rate decays to lr * min_lr_fraction at the last step."""
    schedule: str = "cosine"
    """Decay after warm-up, one of SCHEDULES: cosine or linear."""
    warmup_fraction: float = 0.02
    """Fraction of the steps spent in linear warm-up (at least one step)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices and embeddings (never on norm gains)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    total_tokens: int = 3_000_000
    """Training tokens (rounded up to whole steps); more than the corpus holds means several epochs."""
    checkpoint_tokens: tuple[int, ...] | None = None
    """Token milestones at which to save a checkpoint; None -> n_checkpoints log-spaced ones."""
    n_checkpoints: int = 10
    """How many log-spaced milestones when checkpoint_tokens is None."""
    first_checkpoint_fraction: float = 1 / 64
    """The first log-spaced milestone, as a fraction of total_tokens (the last is total_tokens)."""
    dtype: str = "bf16"
    """Compute mode, one of DTYPES: bf16 (autocast, fp32 master weights) or fp32 (bit-exact resume)."""
    eval_rows: int = 64
    """Held-out rows used for each checkpoint's held-out loss."""
    seed: int = 0
    """Seeds the weight init and the per-epoch shuffles of the training rows."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise SeriesError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.dtype not in DTYPES:
            raise SeriesError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.schedule not in SCHEDULES:
            raise SeriesError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("d_model", "n_layers", "head_dim", "context", "vocab_size", "batch_size", "total_tokens", "n_checkpoints", "eval_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SeriesError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.head_dim:
            raise SeriesError(f"d_model must be a multiple of head_dim={self.head_dim}, got {self.d_model}")
        if self.d_mlp is not None and (not isinstance(self.d_mlp, int) or isinstance(self.d_mlp, bool) or self.d_mlp < 1):
            raise SeriesError(f"d_mlp must be a positive integer or None, got {self.d_mlp!r}")
        if not isinstance(self.n_experts, int) or isinstance(self.n_experts, bool) or self.n_experts < 0:
            raise SeriesError(f"n_experts must be a non-negative integer (0 = dense), got {self.n_experts!r}")
        if self.n_experts > 0:
            k = self.experts_per_token
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.n_experts:
                raise SeriesError(f"experts_per_token must be an integer in [1, n_experts={self.n_experts}], got {k!r}")
        coef = self.router_aux_loss_coef
        if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not (coef >= 0 and math.isfinite(coef)):
            raise SeriesError(f"router_aux_loss_coef must be a finite number >= 0, got {self.router_aux_loss_coef!r}")
        if self.context < 2:
            raise SeriesError(f"context must be at least 2 (BOS plus one token), got {self.context}")
        if self.vocab_size < len(SPECIAL_TOKENS) + 256:
            raise SeriesError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials plus the 256 bytes), got {self.vocab_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SeriesError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.min_lr_fraction <= 1:
            raise SeriesError(f"min_lr_fraction must be in [0, 1], got {self.min_lr_fraction!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise SeriesError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
        if not 0 < self.first_checkpoint_fraction <= 1:
            raise SeriesError(f"first_checkpoint_fraction must be in (0, 1], got {self.first_checkpoint_fraction!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise SeriesError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay!r} and {self.grad_clip!r}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise SeriesError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if self.checkpoint_tokens is not None:
            milestones = list(self.checkpoint_tokens)
            if not milestones or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in milestones):
                raise SeriesError(f"checkpoint_tokens must be a non-empty tuple of positive integers, got {self.checkpoint_tokens!r}")
            if milestones != sorted(set(milestones)) or milestones[-1] > self.total_tokens:
                raise SeriesError(f"checkpoint_tokens must be strictly increasing and at most total_tokens={self.total_tokens}, got {self.checkpoint_tokens!r}")

    # --- derived values ----------------------------------------------------------------------
    @property
    def mlp_width(self) -> int:
        """MLP neurons per layer: d_mlp, or 4 * d_model."""
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_model // self.head_dim

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_tokens / self.tokens_per_step)

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_fraction * self.total_steps)) if self.warmup_fraction > 0 else 0

    @property
    def milestone_steps(self) -> tuple[int, ...]:
        """Steps after which a checkpoint is saved (increasing; the last is total_steps)."""
        if self.checkpoint_tokens is not None:
            wanted = [t / self.tokens_per_step for t in self.checkpoint_tokens]
        else:  # log-spaced in steps, from first_checkpoint_fraction of the run to its end
            lo, hi, n = self.first_checkpoint_fraction * self.total_steps, float(self.total_steps), self.n_checkpoints
            wanted = [hi] if n == 1 else [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
        steps = {min(self.total_steps, max(1, round(s))) for s in wanted}
        steps.add(self.total_steps)
        return tuple(sorted(steps))

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def non_embedding_params(self) -> int:
        """Parameters outside the embedding and unembedding (attention, MLP or experts and router, norms)."""
        if self.is_moe:
            return moe_non_embedding_params(self.d_model, self.n_layers, self.mlp_width, self.n_experts, self.experts_per_token).total
        return non_embedding_params(self.d_model, self.n_layers, self.mlp_width)

    @property
    def active_non_embedding_params(self) -> int:
        """Non-embedding parameters one token uses: only its k experts count (= non_embedding_params when dense)."""
        if self.is_moe:
            return moe_non_embedding_params(self.d_model, self.n_layers, self.mlp_width, self.n_experts, self.experts_per_token).active
        return self.non_embedding_params

    def hf_config(self) -> "LlamaConfig | MixtralConfig":  # noqa: F821
        """The transformers config of this model: ``mixtral_config()`` with experts, else ``llama_config()``."""
        return self.mixtral_config() if self.is_moe else self.llama_config()

    def llama_config(self) -> "LlamaConfig":  # noqa: F821
        """The ``transformers.LlamaConfig`` of this model (gated MLP with ``hidden_act=activation``)."""
        from transformers import LlamaConfig

        if self.is_moe:
            raise SeriesError(f"this config has n_experts={self.n_experts}, so its model is Mixtral; use hf_config() or mixtral_config()")
        return LlamaConfig(intermediate_size=self.mlp_width, **self._shared_hf_fields())

    def mixtral_config(self) -> "MixtralConfig":  # noqa: F821
        """The ``transformers.MixtralConfig`` of this MoE: the dense model's attention, norms, rotary
        embedding and ids (Llama's rms_norm_eps and rope_theta, not Mixtral's), E gated experts of
        width mlp_width with ``hidden_act=activation``, top-k routing.

        ``output_router_logits`` stays False in the saved config: the training loss asks for the
        router logits per call, so a loaded checkpoint's forward (and its ``loss`` with labels)
        is plain next-token prediction without the auxiliary loss added.
        """
        from transformers import LlamaConfig, MixtralConfig

        if not self.is_moe:
            raise SeriesError("this config is dense (n_experts=0); use hf_config() or llama_config()")
        dense = LlamaConfig()  # Llama's defaults where Mixtral's differ (rms_norm_eps 1e-6, rope_theta 1e4)
        return MixtralConfig(
            intermediate_size=self.mlp_width,
            num_local_experts=self.n_experts,
            num_experts_per_tok=self.experts_per_token,
            router_aux_loss_coef=self.router_aux_loss_coef,
            output_router_logits=False,
            router_jitter_noise=0.0,
            sliding_window=None,
            rms_norm_eps=dense.rms_norm_eps,
            rope_parameters=dict(dense.rope_parameters),
            initializer_range=dense.initializer_range,
            experts_implementation=EXPERTS,
            **self._shared_hf_fields(),
        )

    def _shared_hf_fields(self) -> dict[str, Any]:
        """Config fields the dense and the MoE model share."""
        ids = {name.removesuffix("_token") + "_token_id": i for i, name in enumerate(SPECIAL_TOKENS)}
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.d_model,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_heads,
            head_dim=self.head_dim,
            hidden_act=self.activation,
            max_position_embeddings=self.context,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=ids["bos_token_id"],
            eos_token_id=ids["eos_token_id"],
            pad_token_id=ids["pad_token_id"],
            attn_implementation=ATTENTION,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists). A dense config leaves out the expert fields that hold
        their defaults, so its dict (and every manifest and resume check) is what it was before MoE
        support; ``from_dict`` fills them back in."""
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        if self.checkpoint_tokens is not None:
            d["checkpoint_tokens"] = list(self.checkpoint_tokens)
        if not self.is_moe:
            for f in dataclasses.fields(self):
                if f.name in _EXPERT_FIELDS and d[f.name] == f.default:
                    del d[f.name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TinyLMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for key in ("adam_betas", "checkpoint_tokens"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)


_EXPERT_FIELDS = ("n_experts", "experts_per_token", "router_aux_loss_coef")
"""TinyLMConfig fields added for MoE (absent from dense configs written before them)."""


def non_embedding_params(d_model: int, n_layers: int, d_mlp: int | None = None) -> int:
    """Per layer 4·d² attention (full MHA) + 3·d·d_mlp gated MLP + 2·d norm gains; plus the final norm."""
    d_mlp = 4 * d_model if d_mlp is None else d_mlp
    return n_layers * (4 * d_model * d_model + 3 * d_model * d_mlp + 2 * d_model) + d_model


class ParamCount(NamedTuple):
    total: int
    """Every non-embedding parameter (all experts)."""
    active: int
    """The parameters one token's forward uses (its k experts, the whole router)."""


def moe_non_embedding_params(d_model: int, n_layers: int, d_expert: int, n_experts: int, experts_per_token: int) -> ParamCount:
    """Per layer 4·d² attention + E·d router + (E or k)·3·d·d_expert gated experts + 2·d norm gains; plus the final norm."""
    shared = 4 * d_model * d_model + n_experts * d_model + 2 * d_model  # attention, router, norms
    expert = 3 * d_model * d_expert  # gate, up and down of one expert
    return ParamCount(n_layers * (shared + n_experts * expert) + d_model, n_layers * (shared + experts_per_token * expert) + d_model)


class Shape(NamedTuple):
    """A model shape; its width/depth ratio is d_model / n_layers."""

    d_model: int
    n_layers: int


def shapes_at_fixed_params(
    n_params: int,
    ratios: Sequence[float],
    *,
    head_dim: int = 32,
    mlp_ratio: int = 4,
    tolerance: float = 0.15,
) -> list[Shape]:
    """For each width/depth ratio (d_model / n_layers), the (d_model, n_layers) closest to it in
    log-ratio whose non-embedding parameter count (d_mlp = mlp_ratio * d_model) is within
    ``tolerance`` of ``n_params``; d_model is a multiple of ``head_dim``.

    Near ratios can map to the same shape (the grid is coarse at 1-3 M parameters: with
    head_dim 32 and 2 M parameters, ratios 8, 16, 32, 64, 128 give (96, 12), (128, 8), (160, 5),
    (192, 3), (256, 2)). Raises SeriesError when no shape of the grid fits.
    """
    if n_params < 1 or tolerance <= 0 or head_dim < 1:
        raise SeriesError(f"n_params, tolerance and head_dim must be > 0, got {n_params}, {tolerance}, {head_dim}")
    candidates: list[Shape] = []
    for n_layers in range(1, 257):
        # the d_model (continuous) that hits n_params exactly, then the grid points around it
        per_layer = n_params / n_layers
        d_exact = math.sqrt(per_layer / (4 + 3 * mlp_ratio))
        for d_model in {max(1, math.floor(d_exact / head_dim)) * head_dim, math.ceil(d_exact / head_dim) * head_dim}:
            params = non_embedding_params(d_model, n_layers, mlp_ratio * d_model)
            if abs(params / n_params - 1) <= tolerance:
                candidates.append(Shape(d_model, n_layers))
    shapes = []
    for ratio in ratios:
        if not ratio > 0:
            raise SeriesError(f"width/depth ratios must be > 0, got {ratio!r}")
        if not candidates:
            raise SeriesError(f"no (d_model, n_layers) with d_model a multiple of {head_dim} has {n_params} non-embedding parameters within {tolerance:.0%}")
        best = min(candidates, key=lambda s: (abs(math.log(s.d_model / s.n_layers / ratio)),
                                               abs(non_embedding_params(s.d_model, s.n_layers, mlp_ratio * s.d_model) / n_params - 1)))
        shapes.append(best)
    return shapes


def build_model(cfg: TinyLMConfig) -> "LlamaForCausalLM | MixtralForCausalLM":  # noqa: F821
    """A freshly initialised ``LlamaForCausalLM`` (dense) or ``MixtralForCausalLM`` (n_experts > 0)
    for ``cfg`` (float32, seeded by cfg.seed)."""
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    with _fork_rng():
        torch.manual_seed(cfg.seed)
        model = MixtralForCausalLM(cfg.mixtral_config()) if cfg.is_moe else LlamaForCausalLM(cfg.llama_config())
    return model.float()


# -------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, *, model_max_length: int | None = None) -> "PreTrainedTokenizerFast":  # noqa: F821
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same texts in the same order).

    Specials <unk>, <s>, </s>, <pad> take ids 0-3; the 256 byte symbols are always in the
    vocabulary, so any text round-trips through encode/decode exactly. ``tokenizer(text)`` puts
    <s> in front (as the training rows have); ``add_special_tokens=False`` does not. On a small
    corpus the vocabulary can come out smaller than ``vocab_size`` (BPE runs out of merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {eos} $B", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))]
    )
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS, **kwargs)


# ------------------------------------------------------------------------------- token data
class TokenData(NamedTuple):
    tokenizer: "PreTrainedTokenizerFast"  # noqa: F821
    """The BPE tokenizer the rows were made with; saved into every checkpoint."""
    train: torch.Tensor
    """(n_train, context) int64 training rows, each starting with BOS."""
    heldout: torch.Tensor
    """(n_heldout, context) int64 rows training never sees (every heldout_every-th row)."""
    fingerprint: str
    """sha256 of the tokenizer and the rows; a series refuses to resume on different data."""
    info: dict
    """How the data was made: corpus, documents, vocab_size, context, seed, heldout_every, tokens."""


def prepare_token_data(
    corpus,
    directory: str | Path | None = None,
    *,
    vocab_size: int = 4096,
    context: int = 128,
    seed: int = 0,
    heldout_every: int = 20,
) -> TokenData:
    """Tokenizer + training and held-out rows for ``corpus`` (a ``data.Corpus``).

    The tokenizer is trained on every document; ``data.chunk_and_tokenize`` (seeded document
    shuffle, EOS between documents, BOS-prefixed rows of ``context`` tokens) makes the rows, and
    rows with index % heldout_every == heldout_every - 1 are held out. With ``directory``, the
    result is built once (written to a temporary sibling, then renamed) and later calls with the
    same corpus name and arguments load that snapshot, even if the corpus has changed since
    (``stdlib`` grows when packages are installed), so an interrupted series resumes on the
    same rows; other arguments raise SeriesError.
    """
    from data import chunk_and_tokenize

    if heldout_every < 2:
        raise SeriesError(f"heldout_every must be at least 2, got {heldout_every}")
    info = {"corpus": corpus.name, "vocab_size": vocab_size, "context": context, "seed": seed, "heldout_every": heldout_every}
    if directory is not None and (Path(directory) / DATA_JSON).is_file():
        data = load_token_data(directory)
        stored = {k: data.info.get(k) for k in info}
        if stored != info:
            raise SeriesError(f"{directory} holds token data made with {stored}, not {info}; use another directory")
        return data

    tokenizer = train_tokenizer((doc.text for doc in corpus.documents), vocab_size, model_max_length=context)
    rows = [c.token_ids for c in chunk_and_tokenize(corpus.documents, tokenizer, context, seed=seed)]
    if len(rows) < heldout_every:
        raise SeriesError(f"corpus {corpus.name!r} gives {len(rows)} rows of {context} tokens; at least heldout_every={heldout_every} are needed")
    all_rows = torch.tensor(rows, dtype=torch.int64)  # (n_rows, context)
    is_heldout = torch.arange(len(rows)) % heldout_every == heldout_every - 1
    train, heldout = all_rows[~is_heldout].contiguous(), all_rows[is_heldout].contiguous()
    info = {**info, "documents": len(corpus.documents), "tokenizer_vocab": len(tokenizer), "train_rows": len(train), "heldout_rows": len(heldout), "train_tokens": train.numel()}
    data = TokenData(tokenizer, train, heldout, _fingerprint(tokenizer, train, heldout), info)
    if directory is not None:
        _publish_dir(Path(directory), lambda tmp: _save_token_data(data, tmp))
        return load_token_data(directory)
    return data


def load_token_data(directory: str | Path) -> TokenData:
    """Token data written by ``prepare_token_data(..., directory)``."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    try:
        info = json.loads((directory / DATA_JSON).read_text())
        rows = load_file(str(directory / DATA_ROWS))
        tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZER_SUBDIR))
    except (OSError, ValueError) as err:
        raise SeriesError(f"no readable token data in {directory}: {_first_line(err)}") from None
    train, heldout = rows["train"].long(), rows["heldout"].long()
    fingerprint = _fingerprint(tokenizer, train, heldout)
    if fingerprint != info.get("fingerprint"):
        raise SeriesError(f"token data in {directory} does not match its recorded fingerprint (corrupted?)")
    return TokenData(tokenizer, train, heldout, fingerprint, {k: v for k, v in info.items() if k != "fingerprint"})


def _save_token_data(data: TokenData, out: Path) -> None:
    data.tokenizer.save_pretrained(str(out / TOKENIZER_SUBDIR))
    save_file({"train": data.train.to(torch.int32), "heldout": data.heldout.to(torch.int32)}, str(out / DATA_ROWS))
    (out / DATA_JSON).write_text(json.dumps({**data.info, "fingerprint": data.fingerprint}, indent=2))


def _fingerprint(tokenizer, train: torch.Tensor, heldout: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()), sort_keys=True).encode())
    for rows in (train, heldout):
        h.update(str(tuple(rows.shape)).encode())
        h.update(rows.to(torch.int32).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- training
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


def train_tiny_lm(
    cfg: TinyLMConfig,
    data: TokenData,
    out_dir: str | Path,
    *,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    progress: bool = True,
    num_threads: int | None = None,
    compile: bool = False,
) -> list[Checkpoint]:
    """Train ``cfg`` on ``data.train`` and save a checkpoint at each milestone; returns them all.

    Resumes from the newest checkpoint in ``out_dir`` (see the module docstring); raises
    SeriesError when out_dir holds a series with another config or other data, or when the data
    does not fit the config (row length != context, tokenizer larger than vocab_size).
    ``on_checkpoint`` is called after each checkpoint is published (an exception there stops
    training, leaving a resumable series).

    ``num_threads``: torch intra-op threads for this call only (None leaves torch's setting; on a
    CPU shared with other jobs, 1 avoids oversubscription and was 3-4x faster than 2 here).
    ``compile``: run the forward through ``torch.compile`` (about 2x the tokens/s on this CPU
    after a compile of one to two minutes; worth it for runs of a few minutes or more).
    Neither changes the config, so a series may be resumed with other values (then the result
    is no longer bit-identical to an uninterrupted run).
    """
    out_dir = Path(out_dir)
    _check_data(cfg, data)
    for stale in out_dir.glob(f".{CHECKPOINT_PREFIX}*"):  # staging left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    existing = _scan(out_dir)
    _check_series(out_dir, cfg, data, existing)
    _write_heldout(out_dir, data)

    model = build_model(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.adam_betas, eps=1e-8, fused=True,
    )
    checkpoints = [_as_checkpoint(out_dir, rec) for rec in existing]
    _write_manifest(out_dir, cfg, data, existing)
    start_step = existing[-1]["step"] if existing else 0
    if start_step >= cfg.total_steps:
        return checkpoints
    with _threads(num_threads), _fork_rng():  # training owns its RNG stream; the caller's is left as it was
        torch.manual_seed(cfg.seed + 1)
        if existing:
            torch.set_rng_state(_restore(out_dir / existing[-1]["path"], existing[-1], model, opt))
        forward = torch.compile(model) if compile else model
        return _train_loop(cfg, data, out_dir, model, forward, opt, existing, checkpoints, on_checkpoint, progress)


def _train_loop(cfg, data, out_dir, model, forward, opt, existing, checkpoints, on_checkpoint, progress) -> list[Checkpoint]:
    """The step loop; ``forward`` is ``model`` or its torch.compile wrapper (same parameters)."""
    milestones = cfg.milestone_steps
    start_step = existing[-1]["step"] if existing else 0

    bar = None
    if progress:
        from tqdm.auto import tqdm

        desc = f"{cfg.activation} d{cfg.d_model} L{cfg.n_layers}" + (f" E{cfg.n_experts}k{cfg.experts_per_token}" if cfg.is_moe else "")
        bar = tqdm(total=cfg.total_steps, initial=start_step, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    order = _RowOrder(len(data.train), cfg.seed)
    loss_sum, lb_sum, loss_n = 0.0, 0.0, 0
    t0 = time.perf_counter()
    elapsed0 = existing[-1]["elapsed_s"] if existing else 0.0
    records = list(existing)
    forward.train()
    try:
        for step in range(start_step, cfg.total_steps):
            lr = _lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = data.train[order.indices(step * cfg.batch_size, cfg.batch_size)]  # (B, context)
            loss = training_loss(forward, batch, cfg)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_sum += float(loss.ce.detach())
            if loss.load_balancing is not None:
                lb_sum += float(loss.load_balancing.detach())
            loss_n += 1
            done = step + 1
            if bar is not None:
                bar.update(1)
                if done % 10 == 0:
                    extra = {"lb": f"{lb_sum / loss_n:.3f}"} if cfg.is_moe else {}
                    bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}", **extra, lr=f"{lr:.2e}")
            if done in milestones:
                record = {
                    "path": f"{CHECKPOINT_PREFIX}{done * cfg.tokens_per_step}",
                    "step": done,
                    "tokens": done * cfg.tokens_per_step,
                    "epochs": done * cfg.batch_size / len(data.train),
                    "lr": lr,
                    "train_loss": loss_sum / loss_n,
                    "heldout_loss": heldout_loss(forward, data.heldout[: cfg.eval_rows], cfg),
                    "elapsed_s": elapsed0 + time.perf_counter() - t0,
                }
                if cfg.is_moe:  # mean LB over the same steps as train_loss (~k when balanced)
                    record["router_aux_loss"] = lb_sum / loss_n
                forward.train()
                _save_checkpoint(out_dir, model, opt, data, cfg, record, older=records)
                records.append(record)
                _write_manifest(out_dir, cfg, data, records)
                loss_sum, lb_sum, loss_n = 0.0, 0.0, 0
                checkpoint = _as_checkpoint(out_dir, record)
                checkpoints.append(checkpoint)
                if bar is not None:
                    bar.write(f"checkpoint {record['path']}: train {record['train_loss']:.3f}, held-out {record['heldout_loss']:.3f}")
                if on_checkpoint is not None:
                    with _fork_rng():  # whatever the callback draws stays out of training's RNG stream
                        on_checkpoint(checkpoint)
    finally:
        if bar is not None:
            bar.close()
    return checkpoints


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
        raise SeriesError(f"no readable series manifest at {path}: {_first_line(err)}") from None


def load_heldout(out_dir: str | Path) -> torch.Tensor:
    """The series' held-out rows, (n_heldout, context) int64, each starting with BOS."""
    path = Path(out_dir) / HELDOUT_FILE
    try:
        return load_file(str(path))["heldout"].long()
    except (OSError, ValueError, KeyError) as err:
        raise SeriesError(f"no readable held-out rows at {path}: {_first_line(err)}") from None


@torch.no_grad()
def heldout_loss(model, rows: torch.Tensor, cfg: TinyLMConfig) -> float:
    """Mean next-token cross-entropy (nats/token) of an HF causal LM on ``rows`` (n, context)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows[start : start + cfg.batch_size]
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(_loss(model, batch, cfg)) * n
        count += n
    return total / max(1, count)


def measure_throughput(cfg: TinyLMConfig, steps: int = 10, warmup: int = 2, *, num_threads: int | None = None) -> float:
    """Training tokens per second for ``cfg`` on random tokens (forward, backward, AdamW step)."""
    with _threads(num_threads):
        return _throughput(cfg, steps, warmup)


def _throughput(cfg: TinyLMConfig, steps: int, warmup: int) -> float:
    model = build_model(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.context), generator=gen)  # (B, context)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss = training_loss(model, batch, cfg).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * cfg.tokens_per_step / (time.perf_counter() - t0)


class TrainLoss(NamedTuple):
    """The training objective of one batch and its parts (0-dim float32 tensors)."""

    total: torch.Tensor
    """What is backpropagated: ce + router_aux_loss_coef * load_balancing (ce when dense or coef 0)."""
    ce: torch.Tensor
    """Mean next-token cross-entropy (nats/token), computed in float32."""
    load_balancing: torch.Tensor | None
    """LB = mean over layers of E * sum_e f_e * P_e (module docstring; ~k when balanced); None when dense."""


def training_loss(model, batch: torch.Tensor, cfg: TinyLMConfig) -> TrainLoss:
    """The objective of ``cfg`` on ``batch`` (B, context): next-token CE, plus the weighted
    load-balancing loss when the model has experts.

    LB = (1/L) Σ_l LB_l, each LB_l from transformers' own ``load_balancing_loss_func``
    (transformers 5.23) on layer l's router logits alone, upcast to float32, outside autocast.
    Not the model's ``aux_loss`` output: that is the same function on all layers at once, which
    pools the loads over layers (module docstring); and under bf16 autocast its input logits are
    bf16 and its softmax runs in bf16, so its P_e are rounded and its top-k can differ from the
    router's, which takes the softmax of the float32-upcast logits, as done here.
    """
    if not cfg.is_moe:
        ce = _loss(model, batch, cfg)
        return TrainLoss(ce, ce, None)
    dtype = DTYPES[cfg.dtype]
    with torch.autocast(device_type=batch.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(input_ids=batch, output_router_logits=True)
    ce = _cross_entropy(out.logits, batch)
    lb = load_balancing_loss(out.router_logits, cfg.n_experts, cfg.experts_per_token)
    total = ce + cfg.router_aux_loss_coef * lb if cfg.router_aux_loss_coef > 0 else ce
    return TrainLoss(total, ce, lb)


def load_balancing_loss(router_logits: Sequence[torch.Tensor], n_experts: int, k: int) -> torch.Tensor:
    """LB = (1/L) Σ_l E · Σ_e f_{l,e} · P_{l,e} (module docstring) of router logits, one (n, E) tensor per layer.

    Each layer's term is transformers' ``load_balancing_loss_func`` on that layer alone (on the
    whole tuple it would pool the layers), in float32.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    per_layer = [load_balancing_loss_func((logits.float(),), n_experts, k) for logits in router_logits]  # L x ()
    return torch.stack(per_layer).mean()


# ----------------------------------------------------------------------------------- helpers
def _loss(model, batch: torch.Tensor, cfg: TinyLMConfig) -> torch.Tensor:
    """Plain next-token CE (the held-out loss; the dense training loss)."""
    dtype = DTYPES[cfg.dtype]
    with torch.autocast(device_type=batch.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(input_ids=batch).logits  # (B, context, vocab)
    return _cross_entropy(logits, batch)


def _cross_entropy(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean CE of logits (B, context, vocab) predicting batch[:, 1:], in float32."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _lr_at(step: int, cfg: TinyLMConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine or linear decay to cfg.lr * min_lr_fraction at the last step."""
    warm, total = cfg.warmup_steps, cfg.total_steps
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - 1 - warm)  # 0 right after warm-up, 1 at the last step
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * shape)


class _RowOrder:
    """Epoch e visits the rows in ``randperm(n, seed=seed + e)``; position p is row perm_{p // n}[p % n]."""

    def __init__(self, n_rows: int, seed: int):
        self.n, self.seed, self.epoch, self.perm = n_rows, seed, -1, None

    def indices(self, start: int, count: int) -> torch.Tensor:
        out = []
        for pos in range(start, start + count):
            epoch = pos // self.n
            if epoch != self.epoch:
                self.epoch = epoch
                self.perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(int(self.perm[pos % self.n]))
        return torch.tensor(out, dtype=torch.int64)


def _check_data(cfg: TinyLMConfig, data: TokenData) -> None:
    if data.train.ndim != 2 or data.train.shape[1] != cfg.context or data.heldout.ndim != 2 or data.heldout.shape[1] != cfg.context:
        raise SeriesError(f"token rows must be (n, context={cfg.context}), got train {tuple(data.train.shape)} and held-out {tuple(data.heldout.shape)}")
    if len(data.train) == 0 or len(data.heldout) == 0:
        raise SeriesError("token data needs at least one training row and one held-out row")
    if len(data.tokenizer) > cfg.vocab_size:
        raise SeriesError(f"the tokenizer has {len(data.tokenizer)} tokens, more than vocab_size={cfg.vocab_size}")
    ids = {name: getattr(data.tokenizer, name + "_id") for name in SPECIAL_TOKENS}
    if list(ids.values()) != list(range(len(SPECIAL_TOKENS))):
        raise SeriesError(f"the tokenizer's special token ids must be {dict(zip(ids, range(len(ids))))} (made by train_tokenizer), got {ids}")


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
                raise SeriesError(f"corrupted checkpoint record {meta}: {_first_line(err)}") from None
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
                tensors[f"opt.{pid}.{name}"] = value.detach().clone().contiguous() if isinstance(value, torch.Tensor) else torch.tensor(value)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        (tmp / CHECKPOINT_JSON).write_text(json.dumps(meta, indent=2))

    out_dir.mkdir(parents=True, exist_ok=True)
    _publish_dir(out_dir / record["path"], build, replace=True)
    for rec in older:  # only the newest checkpoint keeps the optimizer state
        (out_dir / rec["path"] / OPTIMIZER_FILE).unlink(missing_ok=True)


def _restore(path: Path, record: dict, model, opt) -> torch.Tensor:
    """Load weights and AdamW state from the newest checkpoint ``path``; returns the saved RNG state."""
    try:
        weights = _checkpoint_weights(path, model)
        tensors = load_file(str(path / OPTIMIZER_FILE))
    except (OSError, ValueError) as err:
        raise SeriesError(f"cannot resume from {path}: {_first_line(err)}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise SeriesError(f"cannot resume from {path}: weights do not match the config (missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
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


def _publish_dir(target: Path, build: Callable[[Path], None], *, replace: bool = False) -> None:
    """Build a directory in a temporary sibling and rename it into place (crash-safe)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        if target.exists() and replace:
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:  # another process published it first
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
def _threads(n: int | None):
    """Use ``n`` torch intra-op threads for the block (None: leave as is), then restore."""
    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise SeriesError(f"num_threads must be a positive integer or None, got {n}")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(before)


@contextlib.contextmanager
def _fork_rng():
    """Run a block with its own torch RNG state, restoring the caller's afterwards."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
