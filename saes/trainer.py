"""Trainer: consumes an iterator of float32 (B, d_in) tensors; never imports a model or DuckDB.

Per step:  lr schedule (linear warm-up, constant, linear decay to 0 over the last
`decay_fraction`) -> forward (bf16 autocast optional) -> loss = nmse + auxk_coef·aux (+ the
codebook's λ·MSE) -> backward -> remove the W_dec gradient parallel to each row -> Adam ->
renormalise W_dec rows -> running stats (firing density EMA, inference-threshold EMA after
warm-up, tokens since each latent last fired) -> the module's `post_step` (codebook dead-code
re-init) -> metrics every `log_every` steps to `on_log` and the tqdm bar -> checkpoint.

Exact-resume contract: pass the SAME deterministic iterator again (same batches, same order).
When `checkpoint_dir` holds a checkpoint (and resume=True) the trainer restores weights,
buffers, Adam state, dead-latent counters, RNG state and the running sums it averages between
log lines, then skips the batches already consumed (one per completed step) and continues; the
weights equal an uninterrupted run's and so does every log line except the wall-clock
`tokens_per_s` (both tested bit-for-bit). A checkpoint written before the log sums were saved
still loads; its first log line after the resume then averages only the steps since it.
Checkpoints are `state.safetensors` (tensors) + `state.json` (scalars, configs); no pickle.

Distributed: under `torchrun` (torch.distributed initialised before calling `train`) the module
is wrapped in DistributedDataParallel; each rank passes its own shard iterator; running
statistics are all-reduced so every rank holds identical state; rank 0 logs and checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .config import SAEConfig, TrainConfig
from .errors import CheckpointError, SAEConfigError
from .losses import underused_mask
from .registry import build, get_class

CKPT_SUBDIR = "checkpoint"


@dataclass
class TrainResult:
    sae: torch.nn.Module
    """The trained module (unwrapped, in eval mode)."""
    steps: int
    tokens: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    resumed_from_step: int = 0
    dead_tokens: int = 0
    """The dead-latent window actually used (scaled down for small runs)."""


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _lr_at(step: int, tc: TrainConfig, base_lr: float) -> float:
    total = tc.total_steps
    if tc.warmup_steps > 0 and step < tc.warmup_steps:
        return base_lr * (step + 1) / tc.warmup_steps
    decay_steps = int(round(tc.decay_fraction * total))
    decay_start = total - decay_steps
    if decay_steps > 0 and step >= decay_start:
        return base_lr * max(0.0, (total - step) / decay_steps)
    return base_lr


def _as_batch(t: Any, d_in: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != d_in:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise SAEConfigError(f"batches must be (B, {d_in}) tensors, got {shape}")
    return t.float()


# ----------------------------------------------------------------------------- checkpoints
def _save_checkpoint(root: Path, sae, opt, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    final = root / CKPT_SUBDIR
    tmp = root / (CKPT_SUBDIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    out: dict[str, torch.Tensor] = {f"model.{k}": v.detach().contiguous().clone() for k, v in sae.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for name, v in st.items():
            out[f"opt.{pid}.{name}"] = v.detach().contiguous().clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
    out.update({f"trainer.{k}": v.contiguous() for k, v in tensors.items()})
    out["rng.torch"] = torch.get_rng_state()
    save_file(out, str(tmp / "state.safetensors"))
    meta = dict(state)
    meta["opt_param_groups"] = osd["param_groups"]
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _load_checkpoint(root: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    d = root / CKPT_SUBDIR
    if not (d / "state.json").is_file():
        return None
    try:
        meta = json.loads((d / "state.json").read_text())
        tensors = load_file(str(d / "state.safetensors"))
    except Exception as e:  # noqa: BLE001 - any corruption is one error
        raise CheckpointError(f"corrupted checkpoint in {d}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return meta, tensors


# ----------------------------------------------------------------------------- training
def train(
    sae_cfg: SAEConfig,
    train_cfg: TrainConfig,
    batches: Iterable[torch.Tensor],
    *,
    on_log: Callable[[dict], None] | None = None,
    checkpoint_dir: Path | str | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train an SAE of `sae_cfg` on `batches` (float32 (B, d_in) tensors). See module docstring."""
    cls = get_class(sae_cfg.arch)
    if not getattr(cls, "trainable", True):
        raise SAEConfigError(f"architecture {sae_cfg.arch!r} is inference-only")
    rank, world = _dist()
    tc = train_cfg
    total_steps = tc.total_steps
    dead_tokens = tc.dead_tokens_effective
    base_lr = tc.lr_for(sae_cfg.width)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None

    torch.manual_seed(tc.seed)
    sae = build(sae_cfg)
    sae.train()
    it: Iterator[torch.Tensor] = iter(batches)
    opt = torch.optim.Adam(sae.parameters(), lr=base_lr, betas=tuple(tc.adam_betas), eps=tc.adam_eps, fused=True)
    tokens_since_fired = torch.zeros(sae_cfg.width, dtype=torch.int64)

    loaded = _load_checkpoint(ckpt_root) if (ckpt_root is not None and resume) else None
    start_step, tokens_seen = 0, 0
    pending: list[torch.Tensor] = []
    acc = _empty_log_acc()
    if loaded is not None:
        meta, tens = loaded
        if meta.get("sae_cfg") != sae_cfg.to_dict():
            raise CheckpointError(f"checkpoint in {ckpt_root} was written for a different SAE config")
        sd = {k[len("model."):]: v for k, v in tens.items() if k.startswith("model.")}
        sae.load_state_dict(sd)
        ostate: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tens.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                ostate.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": ostate, "param_groups": meta["opt_param_groups"]})
        tokens_since_fired = tens["trainer.tokens_since_fired"].clone()
        torch.set_rng_state(tens["rng.torch"])
        start_step, tokens_seen = int(meta["step"]), int(meta["tokens"])
        if isinstance(meta.get("log_acc"), dict) and meta["log_acc"].keys() == acc.keys():
            acc = {k: int(v) if k == "n" else float(v) for k, v in meta["log_acc"].items()}
        for _ in range(start_step):  # skip the batches already consumed
            try:
                next(it)
            except StopIteration:
                raise CheckpointError(f"iterator ended before the {start_step} batches the checkpoint consumed") from None
    else:
        # data-dependent init from the first batch(es); they are then trained on
        got = 0
        while got < tc.b_dec_init_tokens:
            try:
                b = _as_batch(next(it), sae_cfg.d_in)
            except StopIteration:
                break
            pending.append(b)
            got += b.shape[0]
        if not pending:
            raise SAEConfigError("batches iterator is empty")
        sample = torch.cat(pending)[: tc.b_dec_init_tokens]
        sae.init_from_data(sample)
        torch.manual_seed(tc.seed + 1)

    model: torch.nn.Module = sae
    if world > 1:
        with torch.no_grad():  # identical start on every rank (init used each rank's own shard)
            for t in list(sae.parameters()) + list(sae.buffers()):
                dist.broadcast(t.data, 0)
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(sae, broadcast_buffers=False)

    bar = None
    if tc.progress_bar and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=f"train {sae_cfg.arch}", file=sys.stderr, dynamic_ncols=True)

    last: dict[str, float] = {}
    t0, tok0 = time.perf_counter(), tokens_seen
    done = start_step
    for step in range(start_step, total_steps):
        if pending:
            x = pending.pop(0)
        else:
            try:
                x = _as_batch(next(it), sae_cfg.d_in)
            except StopIteration:
                break
        lr = _lr_at(step, tc, base_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        if sae_cfg.aux_loss == "auxk":
            aux_mask = tokens_since_fired >= dead_tokens
        elif sae_cfg.aux_loss == "zipf":
            aux_mask = underused_mask(sae.density, sae_cfg.zipf_gamma) if int(sae.density_updates) > 0 else None
        else:
            aux_mask = None
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=tc.bf16_autocast):
            out = model(x, aux_mask)
        loss = out.losses["nmse"] + tc.auxk_coef * out.losses["aux"] + out.losses.get("codebook_mse", 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()

        counts = out.feature_counts.detach().float()
        n_tok = torch.tensor(float(x.shape[0]))
        stat = out.threshold_stat.detach().float() if out.threshold_stat is not None else None
        if world > 1:
            dist.all_reduce(counts)
            dist.all_reduce(n_tok)
            if stat is not None:
                ok = (~torch.isnan(stat)).float()
                s = torch.nan_to_num(stat, nan=0.0)
                dist.all_reduce(s)
                dist.all_reduce(ok)
                stat = torch.where(ok > 0, s / ok.clamp_min(1), torch.full_like(s, float("nan")))
        n_tok_i = int(n_tok)
        sae.update_running_stats(counts, n_tok_i, stat, update_thresholds=step >= tc.warmup_steps)
        tokens_since_fired += n_tok_i
        tokens_since_fired[counts > 0] = 0
        info = sae.post_step(x, step, tc.seed)
        if world > 1 and info.get("codes_reinitialised", 0) > 0:
            with torch.no_grad():
                for p in sae.parameters():
                    dist.broadcast(p.data, 0)
        tokens_seen += n_tok_i

        acc["loss"] += float(loss.detach())
        acc["nmse"] += float(out.losses["nmse"].detach())
        acc["aux"] += float(out.losses["aux"].detach())
        acc["l0"] += float(counts.sum()) / max(1, n_tok_i)
        acc["n"] += 1
        done = step + 1
        if done % tc.log_every == 0 or done == total_steps:
            n = max(1, acc["n"])
            dt = time.perf_counter() - t0
            last = {
                "step": done,
                "tokens": tokens_seen,
                "lr": lr,
                "loss": acc["loss"] / n,
                "fvu": acc["nmse"] / n,
                "aux_loss": acc["aux"] / n,
                "l0": acc["l0"] / n,
                "dead_fraction": float((tokens_since_fired >= dead_tokens).float().mean()),
                "threshold": float(sae.threshold.float().mean()) if getattr(sae, "threshold_kind", None) else float("nan"),
                "tokens_per_s": (tokens_seen - tok0) / dt if dt > 0 else float("nan"),
                "dead_tokens": dead_tokens,
            }
            last.update({k: float(v) for k, v in info.items()})
            acc = _empty_log_acc()
            if rank == 0:
                if on_log is not None:
                    on_log(dict(last))
                if bar is not None:
                    bar.set_postfix(fvu=f"{last['fvu']:.4f}", l0=f"{last['l0']:.1f}", dead=f"{last['dead_fraction']:.3f}")
        if bar is not None:
            bar.update(1)
        if ckpt_root is not None and tc.checkpoint_every > 0 and done % tc.checkpoint_every == 0 and done < total_steps:
            _checkpoint(ckpt_root, sae, opt, sae_cfg, tc, done, tokens_seen, tokens_since_fired, rank, world, acc)
    final_step = done
    if bar is not None:
        bar.close()
    if ckpt_root is not None and final_step > start_step:
        _checkpoint(ckpt_root, sae, opt, sae_cfg, tc, final_step, tokens_seen, tokens_since_fired, rank, world, acc)
    sae.eval()
    return TrainResult(sae=sae, steps=final_step, tokens=tokens_seen, last_metrics=last, resumed_from_step=start_step,
                       dead_tokens=dead_tokens)


def _empty_log_acc() -> dict[str, float]:
    """Running sums of the metrics averaged over the steps between two log lines (and their count)."""
    return {"loss": 0.0, "nmse": 0.0, "aux": 0.0, "l0": 0.0, "n": 0}


def _checkpoint(root: Path, sae, opt, sae_cfg: SAEConfig, tc: TrainConfig, step: int, tokens: int, tsf: torch.Tensor, rank: int, world: int,
                log_acc: dict[str, float]) -> None:
    if rank == 0:
        state = {"step": step, "tokens": tokens, "sae_cfg": sae_cfg.to_dict(),
                 "train_cfg": {k: v for k, v in tc.to_dict().items() if k != "sae"}, "world_size": world,
                 "log_acc": dict(log_acc)}  # Python floats: JSON writes and reads them back bit-exactly (repr)
        _save_checkpoint(root, sae, opt, state, {"tokens_since_fired": tsf})
    if world > 1:
        dist.barrier()
