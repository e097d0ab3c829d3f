"""The tiny LM's config and shape maths: ``TinyLMConfig`` (validated; derived sizes, steps and
checkpoint milestones as properties; the transformers config it maps to), parameter counts, and
model shapes at a fixed parameter count.

The sparsing law (Luo et al. 2024; docs/algorithms.md §4) measures how the activation ratio of a
model's MLP changes with the number of training tokens D, for ReLU and SiLU models and for
several width/depth ratios; these configs describe the models of such a series.

The model is ``transformers.LlamaForCausalLM`` unchanged (wrapped, not reimplemented). Its
MLP is Llama's gated FFN, ``down(act(gate(x)) * up(x))``: activation ``relu`` makes it ReGLU
and ``silu`` makes it SwiGLU, the gated-FFN setting of the paper. With ReLU, ``act(gate(x))``
and the product with ``up(x)`` hold exact zeros; with SiLU they do not.

Mixture of experts (``n_experts > 0``): the model is ``transformers.MixtralForCausalLM`` with the
same attention, norms, rotary embedding, tokenizer and special ids, and each MLP replaced by E
gated experts of width ``mlp_width`` and a linear router (the training objective, with its
load-balancing loss, is in ``workbench.tinylm.train``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from workbench.errors import WorkbenchError
from workbench.tinylm.tokenizer import SPECIAL_TOKENS

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


class SeriesError(WorkbenchError):
    """A bad tiny-LM config, token data that does not fit it, or an out_dir holding another series."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


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
        for name in ("d_model", "n_layers", "head_dim", "context", "vocab_size", "batch_size", "total_tokens", "n_checkpoints",
                     "eval_rows"):
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
            raise SeriesError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials plus the 256 bytes), "
                              f"got {self.vocab_size}")
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
                raise SeriesError(f"checkpoint_tokens must be strictly increasing and at most total_tokens={self.total_tokens}, "
                                  f"got {self.checkpoint_tokens!r}")

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
            raise SeriesError(f"no (d_model, n_layers) with d_model a multiple of {head_dim} has {n_params} "
                              f"non-embedding parameters within {tolerance:.0%}")
        best = min(candidates, key=lambda s: (abs(math.log(s.d_model / s.n_layers / ratio)),
                                               abs(non_embedding_params(s.d_model, s.n_layers, mlp_ratio * s.d_model) / n_params - 1)))
        shapes.append(best)
    return shapes
