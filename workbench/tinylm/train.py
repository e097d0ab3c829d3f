"""The tiny LM's training: a dense Llama (ReLU or SiLU gated MLPs) or a Mixtral-architecture MoE,
trained offline on this CPU for activation sparsity laws, one checkpoint per token milestone.

Mixture of experts (``n_experts > 0``): for the N = batch·context tokens of layer l with router
logits (N, E), p_l = softmax(logits), each token picks its top-k experts S_l(x) and mixes their
outputs with weights p_e / Σ_{S_l(x)} p. Training minimises

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

Training: AdamW (fp32 master weights) with linear warm-up then cosine or linear decay, gradient
clipping, next-token cross-entropy computed in float32; the forward/backward runs under bf16
autocast on CPU by default (``dtype="fp32"`` turns autocast off). The rows are shuffled with a
seed per epoch; the batch of step s is a pure function of (seed, s), so the data position is
just the step count. When the series needs more tokens than the corpus has, it runs several
epochs (the manifest records how many).

Exact-resume contract: the newest checkpoint also holds the AdamW state, the torch RNG and the
series record (``workbench.tinylm.checkpoints``). Re-running ``train_tiny_lm``
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
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from workbench.tinylm.checkpoints import (
    CHECKPOINT_PREFIX,
    Checkpoint,
    _as_checkpoint,
    _check_series,
    _restore,
    _save_checkpoint,
    _scan,
    _write_heldout,
    _write_manifest,
)
from workbench.tinylm.config import DTYPES, SeriesError, TinyLMConfig
from workbench.tinylm.token_data import TokenData
from workbench.tinylm.tokenizer import SPECIAL_TOKENS


def build_model(cfg: TinyLMConfig) -> "LlamaForCausalLM | MixtralForCausalLM":  # noqa: F821
    """A freshly initialised ``LlamaForCausalLM`` (dense) or ``MixtralForCausalLM`` (n_experts > 0)
    for ``cfg`` (float32, seeded by cfg.seed)."""
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    with _fork_rng():
        torch.manual_seed(cfg.seed)
        model = MixtralForCausalLM(cfg.mixtral_config()) if cfg.is_moe else LlamaForCausalLM(cfg.llama_config())
    return model.float()


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
        raise SeriesError(f"token rows must be (n, context={cfg.context}), "
                          f"got train {tuple(data.train.shape)} and held-out {tuple(data.heldout.shape)}")
    if len(data.train) == 0 or len(data.heldout) == 0:
        raise SeriesError("token data needs at least one training row and one held-out row")
    if len(data.tokenizer) > cfg.vocab_size:
        raise SeriesError(f"the tokenizer has {len(data.tokenizer)} tokens, more than vocab_size={cfg.vocab_size}")
    ids = {name: getattr(data.tokenizer, name + "_id") for name in SPECIAL_TOKENS}
    if list(ids.values()) != list(range(len(SPECIAL_TOKENS))):
        raise SeriesError(f"the tokenizer's special token ids must be {dict(zip(ids, range(len(ids))))} "
                          f"(made by train_tokenizer), got {ids}")


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
