"""Configuration dataclasses: `SAEConfig` (the dictionary) nested in the trainer's `TrainConfig`.

Every "(choice)" from docs/algorithms.md §1-2 is a field here with its default, so the saved
`cfg.json` records it. Validation lives in `__post_init__`; derived values are properties, and
nothing here is mutated after construction (the trainer never writes to a config).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from .errors import SAEConfigError

MAX_DIM = 2**31 - 1  # d_in, width and k are 32-bit integers wherever they are stored
K_AUX_CAP = 512  # largest default k_aux: AuxK gathers k_aux*B entries on every step


@dataclass(frozen=True)
class SAEConfig:
    d_in: int
    """Dimension of the activations the SAE reads."""
    width: int
    """Number of latents F (codes N for `codebook`)."""
    k: int
    """Active latents per token (TopK), average budget k*B per batch for the batch-level variants, codes per token for `codebook`."""
    arch: str = "topk"
    """Architecture name; one of `saes.registry.architecture_names()`."""

    # --- auxiliary losses -------------------------------------------------------------------
    aux_loss: Literal["auxk", "zipf", "none"] = "auxk"
    """Which latents the auxiliary top-k loss revives: `auxk` = dead latents (Gao et al.),
    `zipf` = under-used latents (aux_zipf, project's reading of Ayonrinde 2024)."""
    k_aux: int | None = None
    """Latents per token in the auxiliary loss; None -> the largest power of two <= d_in/2, capped at 512
    and at width (choice). The AuxK selection has the fixed shape (B, k_aux) on every step (nothing is
    read from the device to shrink it to the number of eligible latents), so its gathers and decode
    cost k_aux*B entries whether or not a latent is dead: the cap (Gao et al.'s k_aux) bounds that cost."""
    aux_scale_by_dead: bool = True
    """(choice) scale the aux loss by min(#eligible/k_aux, 1), as sae-lens and sparsify do."""
    zipf_gamma: float = 0.1
    """aux_zipf: latent i is under-used when rho_i < gamma * C * rank_i^-alpha."""
    fire_threshold: float = 0.0
    """(choice) a latent 'fires' on a token when its value is > this (0.0: any nonzero activation)."""
    density_decay: float = 0.99
    """EMA decay (per step) of each latent's firing density, used by aux_zipf and Zipf capacities."""

    # --- batch-dependent variants -----------------------------------------------------------
    threshold_decay: float = 0.999
    """(choice) EMA decay of the inference threshold(s); the EMA starts after LR warm-up."""
    capacity: Literal["uniform", "zipf"] = "uniform"
    """feature_choice: capacities m_i; uniform m = k*B/F, or Zipf m_i ~ rank_i^-alpha fitted to running densities."""

    # --- codebook ----------------------------------------------------------------------------
    codebook_combine: Literal["sum", "mean"] = "sum"
    """(choice) codebook output = sum of the k selected codes (paper) or their mean (reference code)."""
    codebook_mse_coef: float = 1.0
    """lambda of the codebook MSE(output, stopgrad(a)) term."""
    dead_code_window: int = 100
    """codebook: re-initialise codes not selected for this many steps."""
    dead_code_noise: float = 0.01
    """codebook: std of the noise added to the random inputs used to re-initialise dead codes."""

    # --- input handling / init ----------------------------------------------------------------
    normalize_inputs: bool = True
    """(choice) scale inputs by one constant so that E||x||^2 = d_in (SAELens expected_average_only_in);
    stored with the SAE, undone on decode."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """b_dec initialisation from a sample of activations."""

    def __post_init__(self) -> None:
        from .registry import check_architecture  # lazy: registry imports the variants

        for name in ("d_in", "width", "k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise SAEConfigError(f"{name} must be an int, got {v!r}")
        for name in ("d_in", "width", "k"):
            if getattr(self, name) > MAX_DIM:
                raise SAEConfigError(f"{name} must be at most {MAX_DIM:,}, got {getattr(self, name):,}")
        if self.d_in <= 0:
            raise SAEConfigError(f"d_in must be > 0, got {self.d_in}")
        if self.width <= 0:
            raise SAEConfigError(f"width must be > 0, got {self.width}")
        if self.k <= 0:
            raise SAEConfigError(f"k must be > 0, got {self.k}")
        if self.k >= self.width:
            raise SAEConfigError(f"k must be < width, got k={self.k} >= width={self.width}")
        check_architecture(self.arch)
        if self.aux_loss not in ("auxk", "zipf", "none"):
            raise SAEConfigError(f"aux_loss must be auxk, zipf or none, got {self.aux_loss!r}")
        if self.k_aux is not None and not (0 < self.k_aux <= self.width):
            raise SAEConfigError(f"k_aux must be in (0, width], got {self.k_aux}")
        if self.capacity not in ("uniform", "zipf"):
            raise SAEConfigError(f"capacity must be uniform or zipf, got {self.capacity!r}")
        if self.codebook_combine not in ("sum", "mean"):
            raise SAEConfigError(f"codebook_combine must be sum or mean, got {self.codebook_combine!r}")
        for name in ("threshold_decay", "density_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise SAEConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise SAEConfigError(f"b_dec_init must be geometric_median, mean or zeros, got {self.b_dec_init!r}")

    @property
    def k_aux_effective(self) -> int:
        """k_aux, defaulting to the largest power of two <= d_in/2 (at least 1), capped at K_AUX_CAP and at width."""
        if self.k_aux is not None:
            return self.k_aux
        return min(self.width, K_AUX_CAP, 2 ** max(0, int(math.floor(math.log2(max(1, self.d_in // 2))))))

    def training_bytes(self, batch_size: int) -> int:
        """A lower bound on the memory one training step needs, in bytes (float32): the
        dictionary's weights with their gradients and two Adam moments, plus the batch's
        pre-activations and their gradient."""
        params = 2 * self.width * self.d_in + self.width + self.d_in  # (d, F), (F, d), biases
        return 4 * (4 * params + 2 * batch_size * self.width)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TrainConfig:
    sae: SAEConfig | None = None
    """Optional nested SAE config (the `train()` function also takes it as its own argument)."""
    lr: float | None = None
    """Adam learning rate; None -> 2e-4 / sqrt(width / 2^14) (Gao et al. scaling)."""
    batch_size: int = 4096
    """Tokens per batch (used to turn total_tokens into steps; batches are whatever the iterator yields)."""
    total_tokens: int = 10_000_000
    """Training stops after this many tokens (steps = ceil(total_tokens / batch_size))."""
    warmup_steps: int = 100
    """Linear LR warm-up steps; threshold EMAs start after it."""
    decay_fraction: float = 0.2
    """Linear LR decay to 0 over this final fraction of steps."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's decay rates of the first and second moment estimates."""
    adam_eps: float = 6.25e-10
    """Adam's epsilon (small, as in Gao et al., since SAE gradients are tiny)."""
    auxk_coef: float = 1 / 32
    """Coefficient of the AuxK / aux_zipf loss."""
    dead_tokens: int | None = None
    """A latent is dead after not firing for this many tokens; None -> min(10M, total_tokens // 10) (recorded in the run)."""
    seed: int = 0
    """Seed of the initialisation and of the order in which batches are read."""
    bf16_autocast: bool | None = None
    """Run the dense encoder matmul in bfloat16 (AMX on CPU, tensor cores on GPU); losses and decode stay fp32.
    None: on when training on CUDA, off elsewhere (saes.devices.autocast_default)."""
    log_every: int = 50
    """Steps between two log lines (averages of the steps since the last line)."""
    checkpoint_every: int = 200
    """Save a resumable checkpoint every N steps when checkpoint_dir is given (0: only at the end)."""
    progress_bar: bool = True
    """Draw a tqdm bar on stderr."""
    b_dec_init_tokens: int = 4096
    """Tokens (from the first batches) used to estimate the input scale and b_dec."""

    def __post_init__(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise SAEConfigError(f"lr must be > 0, got {self.lr}")
        if self.batch_size <= 0:
            raise SAEConfigError(f"batch_size must be > 0, got {self.batch_size}")
        if self.total_tokens <= 0:
            raise SAEConfigError(f"total_tokens must be > 0, got {self.total_tokens}")
        if self.warmup_steps < 0:
            raise SAEConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise SAEConfigError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.dead_tokens is not None and self.dead_tokens <= 0:
            raise SAEConfigError(f"dead_tokens must be > 0, got {self.dead_tokens}")
        if self.log_every <= 0:
            raise SAEConfigError(f"log_every must be > 0, got {self.log_every}")
        if self.checkpoint_every < 0:
            raise SAEConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    def lr_for(self, width: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(width / 2**14)

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.total_tokens / self.batch_size))

    @property
    def dead_tokens_effective(self) -> int:
        return self.dead_tokens if self.dead_tokens is not None else max(1, min(10_000_000, self.total_tokens // 10))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d
