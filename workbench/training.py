"""Train and evaluate sparse dictionaries on a workspace's cached activations.

The glue between three parts that do not know each other: the workspace reader
(``iter_activations``), the ``saes`` trainer (an iterator of tensors in, a module out) and the
language model (for downstream metrics with the reconstruction spliced in). Every SAE gets a
``saes`` row (configuration, status, held-out metrics) and its trainer log lines in
``training_log``; weights live in SAELens layout under the workspace's weights folder.

Resuming: an SAE is identified by its name. Running the same ``train`` again after a crash finds
the row in status ``training`` with the same configuration, and the trainer restores its last
checkpoint and skips the batches it had consumed (the reader is deterministic by seed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import saes
from saes.evals import downstream_metrics, reconstruction_metrics
from workbench.activations import context_ids, iter_activations, iter_shards, shard_hook, shard_units
from workbench.errors import WorkbenchError
from workbench.hooks import attached
from workbench.loader import epochs_for
from workbench.models import model_device
from workbench.safety import check_name, check_writable_dir, confined
from workbench.shards import ShardHook
from workbench.workspace import Workspace, fetch_one

EVAL_CONTEXTS = 16  # held-out contexts scored by the language model (logits are [contexts, L, vocab])


class TrainingError(WorkbenchError):
    """An SAE name or configuration that conflicts with what the workspace holds."""


@dataclass(frozen=True)
class TrainedSAE:
    sae_id: int
    name: str
    path: Path
    metrics: dict[str, float]
    resumed_from_step: int


def run_device(device: str | torch.device | None, model=None) -> torch.device:
    """Where a training, evaluation or analysis runs: ``device`` resolved by ``saes.resolve_device``;
    None means the model's device when a model is given, else auto (CUDA when present)."""
    if device is None and model is not None:
        return model_device(model)
    return saes.resolve_device(device)


def default_name(sae_cfg: saes.SAEConfig, hook: str) -> str:
    return f"{hook}.{sae_cfg.arch}.w{sae_cfg.width}.k{sae_cfg.k}"


def hook_dim(ws: Workspace, run_id: int, hook: str) -> int:
    return int(fetch_one(ws.con, "SELECT d FROM run_hooks WHERE run_id = ? AND hook = ?", [run_id, hook])[0])


def train_tokens_available(ws: Workspace, run_id: int, hook: str) -> int:
    """Tokens in the training split, BOS positions excluded (what ``iter_activations`` yields)."""
    ctx_len = int(fetch_one(ws.con, "SELECT ctx_len FROM runs WHERE run_id = ?", [run_id])[0])
    return len(context_ids(ws, hook, run_id=run_id, split="train")) * (ctx_len - 1)


def available_memory(device: torch.device | None = None) -> int:
    """Bytes of memory this process can still take on ``device``: free GPU memory on CUDA, else the
    host's MemAvailable (total RAM where that is unknown)."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits_in_memory(sae_cfg: saes.SAEConfig, batch_size: int, device: torch.device | None = None) -> None:
    need, have = sae_cfg.training_bytes(batch_size), available_memory(device)
    if need > have:
        where = f" on {device}" if device is not None and device.type == "cuda" else ""
        raise TrainingError(
            f"a {sae_cfg.arch} dictionary of width {sae_cfg.width:,} on d={sae_cfg.d_in} with batches of {batch_size:,} "
            f"needs at least {need / 2**30:,.1f} GiB to train; {have / 2**30:,.1f} GiB are available{where}"
        )


def _existing(ws: Workspace, name: str, config: dict) -> int | None:
    """The id of an unfinished SAE ``name`` with the same configuration (to resume), None when the
    name is free; a finished SAE or another configuration under that name is an error."""
    row = fetch_one(ws.con, "SELECT sae_id, status, config FROM saes WHERE name = ?", [name])
    if row is None:
        return None
    sae_id, status, stored = row
    if status == "done":
        raise TrainingError(f"an SAE named '{name}' is already trained in this workspace; choose another name")
    if json.loads(stored) != config:
        raise TrainingError(f"an unfinished SAE named '{name}' has a different configuration; choose another name")
    return int(sae_id)


def _register(ws: Workspace, name: str, run_id: int, hook: str, sae_cfg: saes.SAEConfig, config: dict, path: Path) -> tuple[int, bool]:
    """Insert the ``saes`` row, or find the unfinished one to resume (status back to
    ``training``); returns (sae_id, resuming)."""
    sae_id = _existing(ws, name, config)
    if sae_id is not None:
        ws.con.execute("UPDATE saes SET status = 'training', error = NULL WHERE sae_id = ?", [sae_id])
        return sae_id, True
    sae_id = fetch_one(
        ws.con,
        """INSERT INTO saes (name, run_id, hook, arch, d_in, width, k, path, config, status)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?::JSON, 'training') RETURNING sae_id""",
        [name, run_id, hook, sae_cfg.arch, sae_cfg.d_in, sae_cfg.width, sae_cfg.k, str(path), json.dumps(config)],
    )[0]
    return int(sae_id), False


@dataclass(frozen=True)
class TrainPlan:
    """An SAE registered and ready to train (decided by rank 0 under torchrun, sent to every rank)."""

    sae_id: int
    name: str
    path: Path
    hook: str
    run_id: int
    sae_cfg: saes.SAEConfig
    train_cfg: saes.TrainConfig
    resuming: bool
    epochs: int
    shard: ShardHook | None  # Parquet runs: what ranks other than 0 read without the workspace


def prepare_training(ws: Workspace, hook: str, sae_fields: dict, train_cfg: saes.TrainConfig, *, name: str | None = None,
                     run_id: int | None = None, out: Path | None = None, device: torch.device | None = None) -> TrainPlan:
    """Every check, then the ``saes`` row (new, or the unfinished one to resume): see ``train_sae``."""
    run_id = ws.resolve_hook_run(hook, run_id)
    sae_cfg = saes.SAEConfig(d_in=hook_dim(ws, run_id, hook), **sae_fields)
    available = train_tokens_available(ws, run_id, hook)
    if available < train_cfg.batch_size:
        raise TrainingError(
            f"only {available} training tokens are cached for '{hook}', fewer than one batch of {train_cfg.batch_size}; "
            "cache more tokens or lower --batch-size"
        )
    name = check_name(name or default_name(sae_cfg, hook), "SAE name")
    path = Path(out).expanduser().resolve() if out else confined(ws.weights_dir, name)
    config = {"sae": sae_cfg.to_dict(), "train": train_cfg.to_dict(), "hook": hook, "run_id": run_id}
    _existing(ws, name, config)  # every check before anything is written
    check_fits_in_memory(sae_cfg, train_cfg.batch_size, device)
    check_writable_dir(path, "weights folder")
    with ws.transaction():
        sae_id, resuming = _register(ws, name, run_id, hook, sae_cfg, config, path)
    epochs = math.ceil(train_cfg.total_tokens / available) + 1  # the trainer stops at total_tokens
    return TrainPlan(sae_id, name, path, hook, run_id, sae_cfg, train_cfg, resuming, epochs, shard_hook(ws, hook, run_id))


def train_sae(
    ws: Workspace,
    hook: str,
    sae_fields: dict,
    train_cfg: saes.TrainConfig,
    *,
    name: str | None = None,
    run_id: int | None = None,
    out: Path | None = None,
    model=None,
    device: str | torch.device | None = None,
) -> TrainedSAE:
    """Train one SAE on ``hook``'s training split, save it, evaluate it on the held-out split.

    ``sae_fields`` are ``SAEConfig`` fields except ``d_in``, which comes from the cache. With
    ``model`` (a loaded ``LoadedModel`` of the run's model) the metrics include CE loss
    recovered and KL with the reconstruction spliced in. ``device`` (see ``run_device``) is where
    the batches arrive, the SAE trains and the evaluation runs; the saved weights are device-free.
    """
    device = run_device(device, model)
    plan = prepare_training(ws, hook, sae_fields, train_cfg, name=name, run_id=run_id, out=out, device=device)
    batches = iter_activations(ws, hook, train_cfg.batch_size, seed=train_cfg.seed, run_id=plan.run_id, split="train",
                               epochs=plan.epochs, device=device)  # [batch_size, d] float32 on the device
    with ws.job("saes", plan.sae_id):  # a failure is recorded on the row; the same command resumes
        result = _train(plan, train_cfg, batches, device, _logger(ws, plan.sae_id))
        return _save_and_evaluate(ws, plan, result, model, device)


def train_sae_ddp(db: str | Path, hook: str, sae_fields: dict, train_cfg: saes.TrainConfig, *, name: str | None = None,
                  run_id: int | None = None, out: Path | None = None, model_loader: Callable | None = None,
                  device: str | torch.device | None = None) -> TrainedSAE | None:
    """``train_sae`` by every process of a torchrun job: DistributedDataParallel over the ranks (nccl
    on CUDA, gloo on the CPU), each reading its disjoint slice of a Parquet run's shards.

    ``train_cfg.batch_size`` is the global batch: each of N ranks trains on batch_size / N per step,
    for the same number of steps as one process would, and the gradients are averaged, so the run
    matches a single process with that batch up to the order of the data. Rank 0 alone opens the
    workspace: it registers the SAE, logs, checkpoints (into the SAE's folder, which every rank
    reads on resume: on several machines it must be on shared storage), saves and evaluates
    (``model_loader(ws, run_id)``, when given, loads the model for downstream metrics). Returns
    the result on rank 0 and None elsewhere."""
    from workbench import distributed

    device = run_device(device)
    rank, size = distributed.init("nccl" if device.type == "cuda" else "gloo")
    if train_cfg.batch_size % size:
        raise TrainingError(f"--batch-size {train_cfg.batch_size} must divide among the {size} processes; use a multiple of {size}")
    ws = Workspace(db, create=False) if rank == 0 else None
    try:
        local = rank_config(train_cfg, size)

        def decide() -> TrainPlan:  # the store and the data first: nothing is written before they pass
            resolved = ws.resolve_hook_run(hook, run_id)
            shard = shard_hook(ws, hook, resolved)
            if shard is None:
                raise TrainingError(f"run {resolved} keeps '{hook}' in the DuckDB file, which one process reads; "
                                    "several processes train from Parquet shards: cache it again with --store parquet")
            units, weights = shard_units(shard, "train")
            if len(units) < size:
                raise TrainingError(f"'{hook}' has {len(units)} row groups of training data, fewer than the {size} processes; "
                                    "cache more tokens or use fewer processes")
            kept = shard.layout.ctx_len - 1  # BOS is skipped
            try:
                epochs = epochs_for([w * kept for w in weights], seed=train_cfg.seed, world=size, batch_size=local.batch_size,
                                    batches=local.total_steps)
            except ValueError as err:
                raise TrainingError(f"'{hook}' cannot feed {size} processes evenly ({err}); cache more tokens or use fewer processes") \
                    from None
            plan = prepare_training(ws, hook, sae_fields, train_cfg, name=name, run_id=resolved, out=out, device=device)
            return dataclasses.replace(plan, epochs=epochs)  # every rank has a batch for every step

        plan = distributed.decided_by_rank0(decide)
        batches = iter_shards(plan.shard, local.batch_size, seed=train_cfg.seed, split="train", epochs=plan.epochs, device=device,
                              rank=rank, world=size)
        if rank != 0:
            _train(plan, local, batches, device, None)
            return None
        with ws.job("saes", plan.sae_id):
            result = _train(plan, local, batches, device, _logger(ws, plan.sae_id))
            model = model_loader(ws, plan.run_id) if model_loader is not None else None
            return _save_and_evaluate(ws, plan, result, model, device)
    finally:
        if ws is not None:
            ws.close()


def rank_config(train_cfg: saes.TrainConfig, world: int) -> saes.TrainConfig:
    """One rank's share of a global training configuration: batch_size / world per step, as many
    steps as the global one, and the dead-latent window in global tokens (the trainer counts
    tokens summed over ranks)."""
    if world == 1:
        return train_cfg
    local_batch = train_cfg.batch_size // world
    return dataclasses.replace(train_cfg, batch_size=local_batch, total_tokens=train_cfg.total_steps * local_batch,
                               dead_tokens=train_cfg.dead_tokens_effective)


def _logger(ws: Workspace, sae_id: int) -> Callable[[dict], None]:
    def log(line: dict) -> None:
        ws.con.execute(
            "INSERT OR REPLACE INTO training_log VALUES (?, ?, ?, ?::JSON)",
            [sae_id, int(line.get("step", 0)), int(line.get("tokens", 0)), json.dumps(line, default=float)],
        )

    return log


def _train(plan: TrainPlan, train_cfg: saes.TrainConfig, batches, device, log) -> saes.TrainResult:
    try:
        result = saes.train(plan.sae_cfg, train_cfg, batches, on_log=log, checkpoint_dir=plan.path, resume=plan.resuming, device=device)
    finally:
        batches.close()  # stops the loader's reader thread (and frees its buffers) before the evaluation reads
    if result.steps < train_cfg.total_steps:  # never recorded as done with a schedule cut short
        raise TrainingError(f"the cached data ran out after {result.steps} of {train_cfg.total_steps} steps")
    return result


def _save_and_evaluate(ws: Workspace, plan: TrainPlan, result: saes.TrainResult, model, device) -> TrainedSAE:
    saes.save_sae(result.sae, plan.path, metadata=sae_lens_metadata(ws, plan.run_id, plan.hook))  # safetensors on the CPU
    metrics = evaluate(ws, result.sae, plan.hook, run_id=plan.run_id, model=model, device=device)
    metrics["train_tokens"] = result.tokens
    metrics["dead_tokens_window"] = result.dead_tokens
    _finish(ws, plan.sae_id, metrics)
    return TrainedSAE(plan.sae_id, plan.name, plan.path, metrics, result.resumed_from_step)


def sae_lens_metadata(ws: Workspace, run_id: int, hook: str) -> dict:
    """cfg.json's metadata from the cache run the SAE was trained on: what sae-lens needs to attach it
    to a model (`SAETransformerBridge.add_sae` reads hook_name) and Neuronpedia to place it. Contexts
    start with BOS (``workbench.data.chunking``)."""
    run = next(r for r in ws.runs() if r["run"] == run_id)
    return {"hook_name": hook, "hook_head_index": None, "model_name": run["model"], "context_size": run["ctx_len"],
            "prepend_bos": True, "dataset_path": run["corpus"]}


def _finish(ws: Workspace, sae_id: int, metrics: dict[str, float]) -> None:
    """Record an SAE as done with its held-out metrics."""
    with ws.transaction() as con:
        con.execute("UPDATE saes SET status = 'done', metrics = ?::JSON, finished_at = current_timestamp WHERE sae_id = ?",
                    [json.dumps(metrics), sae_id])


def evaluate(ws: Workspace, sae: torch.nn.Module, hook: str, *, run_id: int | None = None, model=None,
             device: str | torch.device | None = None) -> dict[str, float]:
    """SAEBench-style core metrics on the held-out split; downstream ones when a model is given.

    The SAE is moved to ``device`` (see ``run_device``) and the held-out batches arrive there; the
    held-out tokens go to the model's device (the spliced patch moves activations to the SAE and back).
    """
    device = run_device(device, model)
    run_id = ws.resolve_hook_run(hook, run_id)
    sae.to(device).eval()
    held_out = iter_activations(ws, hook, 1024, seed=0, run_id=run_id, split="test", epochs=1, drop_last=False, device=device)
    with closing(held_out):  # the reader thread stops even when the metrics raise
        metrics = reconstruction_metrics(sae, held_out)
    if model is not None:
        tokens = held_out_tokens(ws, hook, run_id, limit=EVAL_CONTEXTS).to(model_device(model))  # [n, L]
        metrics.update(downstream_metrics(spliced_loss(model.model, hook, tokens), sae))
    return metrics


def held_out_tokens(ws: Workspace, hook: str, run_id: int, limit: int) -> torch.Tensor:
    """Token ids of up to ``limit`` test-split contexts: [n, ctx_len]."""
    ids = context_ids(ws, hook, run_id=run_id, split="test")[:limit]
    rows = ws.query(
        "SELECT context_id, token_id FROM tokens WHERE context_id IN (SELECT unnest(?::BIGINT[])) ORDER BY context_id, position",
        [ids],
    )
    ctx_len = len(rows) // max(1, len(ids))
    return torch.tensor([t for _, t in rows], dtype=torch.long).view(len(ids), ctx_len)


def spliced_loss(model, hook_name: str, tokens: torch.Tensor, batch_size: int = 4) -> Callable:
    """``run_loss(patch)`` for ``saes.evals.downstream_metrics``.

    Runs the model with ``hook_name``'s activation at positions ≥ 1 replaced by ``patch(acts)`` (BOS
    is left alone: its residual is an outlier no dictionary is trained on) and returns the
    next-token losses [n, L−1] (float32) and logits [n, L−1, vocab] (the model's dtype: bfloat16
    on CUDA by default, half the memory of float32) for positions 0..L−2, on the model's device.
    The logits are written into one preallocated tensor, never held twice.
    """

    def run_loss(patch):
        def splice(acts: torch.Tensor, hook) -> torch.Tensor:
            return torch.cat([acts[:, :1], patch(acts[:, 1:])], dim=1)

        n, L = tokens.shape
        losses = logits = None
        with torch.inference_mode(), attached(model, [(hook_name, splice)] if patch else []):
            for start in range(0, n, batch_size):
                chunk = tokens[start : start + batch_size]  # [b, L]
                out = model(chunk)[:, :-1]  # [b, L-1, vocab]
                if logits is None:
                    logits = out.new_empty(n, L - 1, out.shape[-1])  # [n, L-1, vocab]
                    losses = torch.empty(n, L - 1, dtype=torch.float32, device=out.device)  # [n, L-1]
                logits[start : start + chunk.shape[0]] = out
                losses[start : start + chunk.shape[0]] = F.cross_entropy(out.float().transpose(1, 2), chunk[:, 1:], reduction="none")
        return losses, logits

    return run_loss


def trained_saes(ws: Workspace) -> list[dict]:
    rows = ws.query("SELECT sae_id, name, hook, arch, width, k, status, path, error, metrics FROM saes ORDER BY sae_id")
    keys = ("sae_id", "name", "hook", "arch", "width", "k", "status", "path", "error", "metrics")
    return [dict(zip(keys, r[:-1] + (json.loads(r[-1]) if r[-1] else {},))) for r in rows]


def register_saved(ws: Workspace, directory: Path, hook: str, *, name: str | None = None, run_id: int | None = None,
                   model=None, device: str | torch.device | None = None) -> TrainedSAE:
    """Load an SAE saved in SAELens layout (by this project or by sae-lens), check it fits the
    hook, evaluate it on the held-out split (on ``device``, see ``run_device``) and record it in the workspace."""
    device = run_device(device, model)
    run_id = ws.resolve_hook_run(hook, run_id)
    directory = Path(directory).expanduser().resolve()
    sae = saes.load_sae(directory, expected_d_in=hook_dim(ws, run_id, hook))
    name = check_name(name or re.sub(r"[^A-Za-z0-9._-]", "_", f"{hook}.{directory.name}"), "SAE name")
    config = {"sae": sae.cfg.to_dict(), "hook": hook, "run_id": run_id, "loaded_from": str(directory)}
    _existing(ws, name, config)
    with ws.transaction():
        sae_id, _ = _register(ws, name, run_id, hook, sae.cfg, config, directory)
    with ws.job("saes", sae_id):
        metrics = evaluate(ws, sae, hook, run_id=run_id, model=model, device=device)
        _finish(ws, sae_id, metrics)
    return TrainedSAE(sae_id, name, directory, metrics, 0)
