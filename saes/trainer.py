"""Trainer: consumes an iterator of (B, d_in) tensors on any device; never imports a model or DuckDB.

Per step:  lr schedule (linear warm-up, constant, linear decay to 0 over the last
`decay_fraction`) -> forward (bf16 autocast optional) -> loss = nmse + auxk_coef·aux (+ the
codebook's λ·MSE) -> backward -> remove the W_dec gradient parallel to each row -> Adam ->
renormalise W_dec rows -> running stats (firing density EMA, inference-threshold EMA after
warm-up, tokens since each latent last fired) -> the module's `post_step` (codebook dead-code
re-init) -> metrics every `log_every` steps to `on_log` and the tqdm bar -> checkpoint.

Devices: `device` is resolved by `saes.devices.resolve_device` (None / "auto": CUDA when present,
else the CPU; "cpu", "cuda[:N]", "meta"). The SAE is initialised on the CPU from the seed (every
device starts from the same weights) and moved there; each batch (fp16, bf16 or fp32, on the CPU
or already on the device) is moved with non_blocking=True and converted to float32 on the device.
All trainer state lives on the device (tokens since each latent fired, the log sums); batch sizes
are host ints from the shapes. The steady step reads nothing into Python (tested on the CPU with
a counting TorchFunctionMode, and on meta, where a read raises): the log sums are read once per
`log_every` steps with one `.tolist()`, and checkpoints copy the state to the host. Documented
exceptions: Feature Choice with Zipf capacities reads one number per step, and on the CPU the
fast paths of saes.sparse_ops (numpy sorts, BatchTopK's saturated-row count) read CPU memory.
On meta (shape-only, for tests) log values are NaN and checkpoints are refused.

Exact-resume contract: pass the SAME deterministic iterator again (same batches, same order).
When `checkpoint_dir` holds a checkpoint (and resume=True) the trainer restores weights,
buffers, Adam state, dead-latent counters, RNG states (CPU, and CUDA when training there) and the
running sums it averages between log lines, then skips the batches already consumed (one per
completed step) and continues. On the CPU the weights equal an uninterrupted run's and so does
every log line except the wall-clock `tokens_per_s` (both tested bit-for-bit); on CUDA only with
`torch.use_deterministic_algorithms(True)` (index_add_ and scatter use atomics), else within
float tolerance. A checkpoint written on one device resumes on another (tensors are loaded on
the CPU and copied to the device). A checkpoint written before the log sums were saved still
loads; its first log line after the resume then averages only the steps since it.
Checkpoints are `state.safetensors` (tensors) + `state.json` (scalars, configs); no pickle.

Distributed: under `torchrun` (torch.distributed initialised before calling `train`) the module
is wrapped in DistributedDataParallel; each rank passes its own shard iterator; running
statistics are all-reduced so every rank holds identical state; rank 0 logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import math
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
from .devices import autocast_default, resolve_device
from .errors import CheckpointError, SAEConfigError
from .losses import underused_mask
from .registry import build, get_class

CKPT_SUBDIR = "checkpoint"
LOG_SUMS = ("loss", "nmse", "aux", "l0")
"""The per-step values averaged between two log lines (device sums, saved with checkpoints as `log_acc`)."""


@dataclass
class TrainResult:
    sae: torch.nn.Module
    """The trained module (unwrapped, in eval mode, on the training device)."""
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


def _as_batch(t: Any, d_in: int, device: torch.device) -> torch.Tensor:
    """A (B, d_in) batch on the device in float32 (moved first: a half-precision batch travels at half the bytes)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != d_in:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise SAEConfigError(f"batches must be (B, {d_in}) tensors, got {shape}")
    return t.to(device, non_blocking=True).float()


def _autocast(device: torch.device, enabled: bool):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
    return contextlib.nullcontext()  # meta: no autocast


def _adam(sae: torch.nn.Module, device: torch.device, lr: float, tc: TrainConfig) -> torch.optim.Optimizer:
    """Fused Adam (its step count stays on the device) where torch has the kernel; the plain loop elsewhere (meta)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=tuple(tc.adam_betas), eps=tc.adam_eps, fused=fused or None,
                            foreach=None if fused else False)


def _read(t: torch.Tensor) -> list[float]:
    """The one host read of a log line (NaN on meta, which has no values)."""
    return [math.nan] * t.numel() if t.device.type == "meta" else t.tolist()


# ----------------------------------------------------------------------------- checkpoints
def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _save_checkpoint(root: Path, sae, opt, state: dict[str, Any], tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    final = root / CKPT_SUBDIR
    tmp = root / (CKPT_SUBDIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    out: dict[str, torch.Tensor] = {f"model.{k}": _host(v) for k, v in sae.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for name, v in st.items():
            out[f"opt.{pid}.{name}"] = _host(v) if isinstance(v, torch.Tensor) else torch.tensor(v)
    out.update({f"trainer.{k}": _host(v) for k, v in tensors.items()})
    out["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    save_file(out, str(tmp / "state.safetensors"))
    meta = dict(state)
    meta["opt_param_groups"] = osd["param_groups"]
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _load_checkpoint(root: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(state.json, tensors on the CPU) of the checkpoint in root, or None; the caller copies them to its device."""
    d = root / CKPT_SUBDIR
    if not (d / "state.json").is_file():
        return None
    try:
        meta = json.loads((d / "state.json").read_text())
        tensors = load_file(str(d / "state.safetensors"), device="cpu")
    except Exception as e:  # noqa: BLE001 - any corruption is one error
        raise CheckpointError(f"corrupted checkpoint in {d}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return meta, tensors


# ----------------------------------------------------------------------------- training
def train(
    sae_cfg: SAEConfig,
    train_cfg: TrainConfig,
    batches: Iterable[torch.Tensor],
    *,
    device: str | torch.device | None = None,
    on_log: Callable[[dict], None] | None = None,
    checkpoint_dir: Path | str | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train an SAE of `sae_cfg` on `batches` ((B, d_in) tensors) on `device` (None: auto). See module docstring."""
    cls = get_class(sae_cfg.arch)
    if not getattr(cls, "trainable", True):
        raise SAEConfigError(f"architecture {sae_cfg.arch!r} is inference-only")
    dev = resolve_device(device)
    rank, world = _dist()
    tc = train_cfg
    total_steps = tc.total_steps
    dead_tokens = tc.dead_tokens_effective
    base_lr = tc.lr_for(sae_cfg.width)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_root is not None and dev.type == "meta":
        raise SAEConfigError("checkpoints need tensor values: train on cpu or cuda, not meta")
    use_autocast = autocast_default(dev) if tc.bf16_autocast is None else tc.bf16_autocast

    torch.manual_seed(tc.seed)
    sae = build(sae_cfg).to(dev)  # initialised on the CPU from the seed, so every device starts alike
    sae.train()
    it: Iterator[torch.Tensor] = iter(batches)
    opt = _adam(sae, dev, base_lr, tc)
    tokens_since_fired = torch.zeros(sae_cfg.width, dtype=torch.int64, device=dev)  # (F,)
    log_sums = torch.zeros(len(LOG_SUMS), dtype=torch.float64, device=dev)  # sums of LOG_SUMS since the last log line
    log_n = 0

    loaded = _load_checkpoint(ckpt_root) if (ckpt_root is not None and resume) else None
    start_step, tokens_seen = 0, 0
    pending: list[torch.Tensor] = []
    if loaded is not None:
        meta, tens = loaded
        if meta.get("sae_cfg") != sae_cfg.to_dict():
            raise CheckpointError(f"checkpoint in {ckpt_root} was written for a different SAE config")
        if int(meta.get("world_size", 1)) != world:  # each rank's data slice depends on the number of ranks
            raise CheckpointError(f"checkpoint in {ckpt_root} was written by {meta.get('world_size', 1)} process(es); "
                                  f"resume it with as many (this run has {world})")
        sae.load_state_dict({k[len("model."):]: v for k, v in tens.items() if k.startswith("model.")})  # copied onto dev
        ostate: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tens.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                ostate.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": ostate, "param_groups": meta["opt_param_groups"]})  # Adam moves them to the params
        tokens_since_fired = tens["trainer.tokens_since_fired"].to(dev)
        torch.set_rng_state(tens["rng.torch"])
        if dev.type == "cuda" and "rng.cuda" in tens:
            torch.cuda.set_rng_state(tens["rng.cuda"], dev)
        start_step, tokens_seen = int(meta["step"]), int(meta["tokens"])
        acc = meta.get("log_acc")
        if isinstance(acc, dict) and set(acc) == {*LOG_SUMS, "n"}:
            log_sums = torch.tensor([float(acc[k]) for k in LOG_SUMS], dtype=torch.float64, device=dev)
            log_n = int(acc["n"])
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
                b = _as_batch(next(it), sae_cfg.d_in, dev)
            except StopIteration:
                break
            pending.append(b)
            got += b.shape[0]
        if not pending:
            raise SAEConfigError("batches iterator is empty")
        sae.init_from_data(torch.cat(pending)[: tc.b_dec_init_tokens])
        torch.manual_seed(tc.seed + 1)
    if world > 1:  # every rank must resume from the same step (a rank that cannot see the checkpoint would start over)
        steps = [torch.full((), start_step, dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(steps, torch.full((), start_step, dtype=torch.int64, device=dev))
        if len({int(t) for t in steps}) != 1:
            raise CheckpointError(f"ranks resume from different steps {[int(t) for t in steps]}: the checkpoint folder "
                                  f"{ckpt_root} must be on storage every rank reads")
    tokens_dev = torch.full((), tokens_seen, dtype=torch.int64, device=dev) if world > 1 else None  # DDP: summed over ranks

    model: torch.nn.Module = sae
    if world > 1:
        with torch.no_grad():  # identical start on every rank (init used each rank's own shard)
            for t in list(sae.parameters()) + list(sae.buffers()):
                dist.broadcast(t.data, 0)
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(sae, broadcast_buffers=False, device_ids=[dev] if dev.type == "cuda" else None)

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
                x = _as_batch(next(it), sae_cfg.d_in, dev)
            except StopIteration:
                break
        lr = _lr_at(step, tc, base_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        if sae_cfg.aux_loss == "auxk" and tokens_dev is None and tokens_seen < dead_tokens:
            aux_mask = None  # no latent can be dead before dead_tokens tokens were seen: skip AuxK's gathers (a host count)
        elif sae_cfg.aux_loss == "auxk":
            aux_mask = tokens_since_fired >= dead_tokens  # (F,)
        elif sae_cfg.aux_loss == "zipf":
            aux_mask = underused_mask(sae.density, sae_cfg.zipf_gamma)  # all False before the first density update
        else:
            aux_mask = None
        with _autocast(dev, use_autocast):
            out = model(x, aux_mask)
        loss = out.losses["nmse"] + tc.auxk_coef * out.losses["aux"] + out.losses.get("codebook_mse", 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()

        counts = out.feature_counts.detach().float()  # (F,)
        n_tok: int | torch.Tensor = x.shape[0]  # a host int: no round trip through the device
        stat = out.threshold_stat.detach().float() if out.threshold_stat is not None else None
        if world > 1:
            packed = torch.cat([counts, counts.new_full((1,), n_tok)])
            dist.all_reduce(packed)
            counts, n_tok = packed[:-1], packed[-1].long()
            if stat is not None:
                ok = (~torch.isnan(stat)).float()
                s = torch.nan_to_num(stat, nan=0.0)
                dist.all_reduce(s)
                dist.all_reduce(ok)
                stat = torch.where(ok > 0, s / ok.clamp_min(1), torch.full_like(s, float("nan")))
        sae.update_running_stats(counts, n_tok, stat, update_thresholds=step >= tc.warmup_steps)
        tokens_since_fired += n_tok
        tokens_since_fired.masked_fill_(counts > 0, 0)
        info = sae.post_step(x, step, tc.seed)
        if world > 1 and "codes_reinitialised" in info:  # re-drawn codes come from each rank's own batch
            with torch.no_grad():
                for p in sae.parameters():
                    dist.broadcast(p.data, 0)
        if tokens_dev is not None:
            tokens_dev += n_tok
        else:
            tokens_seen += n_tok

        n_div = n_tok.clamp_min(1) if isinstance(n_tok, torch.Tensor) else max(1, n_tok)
        step_vals = [loss.detach(), out.losses["nmse"].detach(), out.losses["aux"].detach(), counts.sum().double() / n_div]
        log_sums += torch.stack([v.double() for v in step_vals])
        log_n += 1
        done = step + 1
        if done % tc.log_every == 0 or done == total_steps:
            extra = [(tokens_since_fired >= dead_tokens).double().mean(), sae.threshold.double().mean()
                     if getattr(sae, "threshold_kind", None) else torch.full((), math.nan, device=dev)]
            extra += [v.double().reshape(()) for v in info.values()] + ([tokens_dev.double()] if tokens_dev is not None else [])
            vals = _read(torch.cat([log_sums, torch.stack(extra)]))  # the step's one host read
            sums, (dead_fraction, threshold, *rest) = vals[: len(LOG_SUMS)], vals[len(LOG_SUMS):]
            if tokens_dev is not None:
                tokens_seen = int(rest.pop())
            n = max(1, log_n)
            dt = time.perf_counter() - t0
            last = {
                "step": done,
                "tokens": tokens_seen,
                "lr": lr,
                "loss": sums[0] / n,
                "fvu": sums[1] / n,
                "aux_loss": sums[2] / n,
                "l0": sums[3] / n,
                "dead_fraction": dead_fraction,
                "threshold": threshold,
                "tokens_per_s": (tokens_seen - tok0) / dt if dt > 0 else float("nan"),
                "dead_tokens": dead_tokens,
            }
            last.update(zip(info.keys(), rest))
            log_sums.zero_()
            log_n = 0
            if rank == 0:
                if on_log is not None:
                    on_log(dict(last))
                if bar is not None:
                    bar.set_postfix(fvu=f"{last['fvu']:.4f}", l0=f"{last['l0']:.1f}", dead=f"{last['dead_fraction']:.3f}")
        if bar is not None:
            bar.update(1)
        if ckpt_root is not None and tc.checkpoint_every > 0 and done % tc.checkpoint_every == 0 and done < total_steps:
            tokens_seen = _tokens(tokens_dev, tokens_seen)
            _checkpoint(ckpt_root, sae, opt, sae_cfg, tc, done, tokens_seen, tokens_since_fired, rank, world, log_sums, log_n, dev)
    final_step = done
    tokens_seen = _tokens(tokens_dev, tokens_seen)
    if bar is not None:
        bar.close()
    if ckpt_root is not None and final_step > start_step:
        _checkpoint(ckpt_root, sae, opt, sae_cfg, tc, final_step, tokens_seen, tokens_since_fired, rank, world, log_sums, log_n, dev)
    sae.eval()
    return TrainResult(sae=sae, steps=final_step, tokens=tokens_seen, last_metrics=last, resumed_from_step=start_step,
                       dead_tokens=dead_tokens)


def _tokens(tokens_dev: torch.Tensor | None, tokens_seen: int) -> int:
    """Tokens seen so far: the host count, or under DDP the device sum over ranks (a read, at checkpoints and the end)."""
    return tokens_seen if tokens_dev is None or tokens_dev.device.type == "meta" else int(tokens_dev.item())


def _checkpoint(root: Path, sae, opt, sae_cfg: SAEConfig, tc: TrainConfig, step: int, tokens: int, tsf: torch.Tensor, rank: int, world: int,
                log_sums: torch.Tensor, log_n: int, device: torch.device) -> None:
    if rank == 0:
        log_acc = {**dict(zip(LOG_SUMS, log_sums.tolist())), "n": log_n}  # Python floats: JSON writes and reads them back bit-exactly
        state = {"step": step, "tokens": tokens, "sae_cfg": sae_cfg.to_dict(),
                 "train_cfg": {k: v for k, v in tc.to_dict().items() if k != "sae"}, "world_size": world, "log_acc": log_acc}
        _save_checkpoint(root, sae, opt, state, {"tokens_since_fired": tsf}, device)
    if world > 1:
        dist.barrier()
