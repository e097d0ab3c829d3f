"""The GPU check: one command, one line per check (PASS / FAIL / SKIP, its figure, its seconds).

    (a) every architecture's training forward and gradients on the device vs the same SAE on the CPU
    (b) host syncs per steady training step, under torch.cuda.set_sync_debug_mode("warn")
    (c) training tokens/s and peak memory at d 2304, width 65,536, k 64, batch 4,096, bf16,
        side by side with eai-sparsify's TopK on the same device and shapes
    (d) loader rows/s into the device from a synthetic workspace, vs the trainer's consumption
    (e) caching tokens/s through a random 2-layer Llama at d 2304 vs its bare truncated forward
    (f) the steering hooks under set_sync_debug_mode("error")
    (g) the test suite's `gpu`-marked tests
    (h) caching into Parquet shards on the device, and loader rows/s from the shards into it
    (0), first: every package the checks import is importable

On a GPU machine without network (see the README, "Checking on a GPU"):

    bash benchmarks/gpu_bundle.sh                                   # here: wheels + tokenizer
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.whl .
    PYTHONPATH=/tmp/site WORKBENCH_CACHE=.gpu/cache python3 benchmarks/gpu_check.py

``--smoke`` runs every check at toy shapes on whatever device there is (the CPU here); the test
suite runs it that way so this script cannot rot between GPU sessions. Checks that only mean
something on CUDA (sync counts) say SKIP on the CPU: the suite's host-read tests cover them there.
No check starts after ``--budget`` seconds (default 390), so the command ends inside 7 minutes.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_post"
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_loader: the synthetic workspace, the random Llama, the caching timing


@dataclass(frozen=True)
class Shapes:
    d: int
    width: int
    k: int
    batch: int
    steps: int
    llama_d: int
    cache_tokens: int
    ctx: int
    loader_d: int
    loader_tokens: int


FULL = Shapes(d=2304, width=65_536, k=64, batch=4096, steps=30, llama_d=2304, cache_tokens=262_144, ctx=1024,
              loader_d=2304, loader_tokens=1_048_576)
SMOKE = Shapes(d=64, width=512, k=8, batch=256, steps=6, llama_d=64, cache_tokens=4096, ctx=64, loader_d=64, loader_tokens=16_384)


class Check:
    """Collects one line per check; ``ok`` None means SKIP. A check that would start after ``budget_s``
    seconds is skipped, so the whole command ends inside its time slot."""

    def __init__(self, budget_s: float = float("inf")):
        self.failed = 0
        self.deadline = time.perf_counter() + budget_s

    def run(self, name: str, fn, *args):
        started = time.perf_counter()
        if started > self.deadline:
            print(f"SKIP  {name:<28} time budget spent", flush=True)
            return
        try:
            ok, figure = fn(*args)
        except Exception as err:  # noqa: BLE001 - one line per check, whatever broke
            ok, figure = False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        word = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.failed += ok is False
        print(f"{word:<4}  {name:<28} {figure}  ({time.perf_counter() - started:.1f} s)", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def trainable() -> list[str]:
    import saes

    return [a for a in saes.architecture_names() if getattr(saes.get_class(a), "trainable", True)]


# -- (0) what the checks import ---------------------------------------------------------------
PACKAGES = ("duckdb", "transformer_lens.model_bridge", "sparsify", "workbench.data", "workbench.loader", "saes")


def packages():
    import importlib

    missing = []
    for name in PACKAGES:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - report every one that is missing
            missing.append(f"{name} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    return not missing, "all importable" if not missing else "missing: " + "; ".join(missing)


# -- (a) fast paths on the device vs the CPU -----------------------------------------------------
def fast_path(arch: str, device: torch.device, s: Shapes):
    import saes

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    cfg = saes.SAEConfig(d_in=s.d, width=s.width // 8, k=s.k // 2, arch=arch)
    x = torch.randn(s.batch // 4, s.d)
    cpu = saes.build(cfg)
    cpu.init_from_data(x)
    cpu.train()
    dev = copy.deepcopy(cpu).to(device)
    dead = torch.zeros(cfg.width, dtype=torch.bool)
    dead[::3] = True
    out = {}
    for name, sae, xb, mask in (("cpu", cpu, x, dead), ("dev", dev, x.to(device), dead.to(device))):
        o = sae(xb, mask)
        (o.losses["nmse"] + o.losses["aux"] / 32).backward()
        out[name] = (o, {n: p.grad for n, p in sae.named_parameters()})
    (oc, gc), (od, gd) = out["cpu"], out["dev"]
    errors = {"recon": rel(od.reconstruction, oc.reconstruction), "nmse": rel(od.losses["nmse"], oc.losses["nmse"]),
              "aux": rel(od.losses["aux"], oc.losses["aux"]) if float(oc.losses["aux"].detach()) else 0.0}
    errors.update({f"grad {n}": rel(gd[n], gc[n]) for n in gc if gc[n] is not None})
    worst = max(errors, key=errors.get)
    # fp32 on both sides, TF32 off: the sums differ only in order (~1e-6); a selection that flips on
    # a near-tie moves a few entries, which stays far below 1e-3 of the norm.
    return errors[worst] < 1e-3, f"worst relative error {errors[worst]:.1e} ({worst})"


# -- (b) host syncs per steady step ---------------------------------------------------------------
def syncs_per_step(arch: str, device: torch.device, s: Shapes):
    import saes

    if device.type != "cuda":
        return None, "CUDA only (on the CPU: tests/saes/test_device.py counts host reads)"
    cfg = saes.SAEConfig(d_in=s.d, width=s.width // 8, k=s.k // 2, arch=arch)
    gen = torch.Generator(device=device).manual_seed(0)
    data = [torch.randn(s.batch, s.d, device=device, generator=gen) for _ in range(4)]

    def count(steps: int) -> int:
        tc = saes.TrainConfig(batch_size=s.batch, total_tokens=s.batch * steps, warmup_steps=0, log_every=10**9,
                              progress_bar=False, b_dec_init_tokens=s.batch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                saes.train(cfg, tc, (data[i % 4] for i in range(steps)), device=device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    short, long = count(4), count(4 + s.steps)
    per_step = (long - short) / s.steps
    return per_step <= 1.0, f"{per_step:.2f} syncs per steady step (target <= 1)"


# -- (c) training speed vs eai-sparsify ---------------------------------------------------------
def train_speed(device: torch.device, s: Shapes, out: dict):
    import saes

    gen = torch.Generator(device=device).manual_seed(0)
    data = [torch.randn(s.batch, s.d, device=device, generator=gen) for _ in range(4)]
    warm = 3

    def ours() -> tuple[float, float]:
        stamps = []

        def batches():  # batch 0 initialises b_dec and is step 0's; batch i is asked for as step i starts
            for i in range(s.steps + warm):
                if i == warm:
                    sync(device)  # the one wait: steps warm … warm + steps - 1 are timed, as sparsify's are
                    stamps.append(time.perf_counter())
                yield data[i % 4]

        # Both sides without the auxiliary loss (sparsify skips it with no dead latents): the main step compared.
        cfg = saes.SAEConfig(d_in=s.d, width=s.width, k=s.k, arch="topk", aux_loss="none")
        tc = saes.TrainConfig(batch_size=s.batch, total_tokens=s.batch * (s.steps + warm), warmup_steps=0, log_every=10**9,
                              progress_bar=False, bf16_autocast=True, b_dec_init_tokens=s.batch)
        reset_peak(device)
        saes.train(cfg, tc, batches(), device=device)
        sync(device)
        stamps.append(time.perf_counter())
        return s.batch * s.steps / (stamps[-1] - stamps[0]), peak(device)

    def sparsify() -> tuple[float, float]:
        if device.type != "cuda":
            os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(0)
        sae = SparseCoder(s.d, SparseCoderConfig(num_latents=s.width, k=s.k), device=device)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        reset_peak(device)
        for i in range(s.steps + warm):
            if i == warm:
                sync(device)
                start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                o = sae(data[i % 4], dead_mask=None)
            (o.fvu + o.auxk_loss / 32).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sae.set_decoder_norm_to_unit_norm()
        sync(device)
        return s.batch * s.steps / (time.perf_counter() - start), peak(device)

    ours_rate, ours_peak = ours()
    theirs_rate, theirs_peak = sparsify()
    out["trainer_tokens_per_s"] = ours_rate
    ratio = ours_rate / theirs_rate
    figure = (f"ours {ours_rate / 1e3:,.0f} K tok/s ({ours_peak:.1f} GiB peak), eai-sparsify {theirs_rate / 1e3:,.0f} K tok/s "
              f"({theirs_peak:.1f} GiB peak): {ratio:.2f}x (d {s.d}, width {s.width:,}, k {s.k}, batch {s.batch:,}, bf16, no aux loss)")
    return (ratio >= 1.0) if device.type == "cuda" else None, figure


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


# -- (d) loader into the device -----------------------------------------------------------------
def loader_rate(db: Path, batch: int, device: torch.device) -> float:
    """Rows/s of one epoch of the workspace's first cached hook into ``device`` (either store)."""
    from workbench.activations import iter_activations
    from workbench.workspace import Workspace

    with Workspace(db, read_only=True) as ws:
        hook = ws.cached_hooks()[0][2]
        rows, started = 0, time.perf_counter()
        for x in iter_activations(ws, hook, batch, device=device):
            rows += x.shape[0]
        sync(device)
        return rows / (time.perf_counter() - started)


def loader(device: torch.device, s: Shapes, out: dict, tmp: Path):
    from bench_loader import synthetic_workspace  # the loader benchmark's own builder


    db = synthetic_workspace(tmp / "loader.duckdb", d=s.loader_d, tokens=s.loader_tokens, ctx=s.ctx)
    rate = loader_rate(db, s.batch, device)
    need = out.get("trainer_tokens_per_s")
    figure = f"{rate / 1e3:,.0f} K rows/s at d {s.loader_d} into {device}" + (
        f", {rate / need:.2f}x the trainer's {need / 1e3:,.0f} K tok/s" if need else "")
    return (rate >= need) if (need and device.type == "cuda") else None, figure


# -- (e) caching through a random Llama ---------------------------------------------------------
def caching(device: torch.device, s: Shapes, tmp: Path):
    from bench_loader import caching_overhead  # the loader benchmark's measurement, on this device

    t = caching_overhead(tmp / "caching", s.llama_d, 2, s.cache_tokens, repeats=1, device=str(device))
    n, overhead = t["tokens"], t["running"] / t["bare"] - 1
    figure = (f"caching {n / t['cache'] / 1e3:,.1f} K tok/s, bare truncated forward {n / t['bare'] / 1e3:,.1f} K tok/s: "
              f"overhead {overhead:+.0%} while the model runs (+{t['tail']:.2f} s once at the end), 2-layer Llama d {s.llama_d}")
    return (overhead <= 0.10) if device.type == "cuda" else None, figure


# -- (f) steering hooks without a sync ----------------------------------------------------------
def steering(device: torch.device, s: Shapes, tmp: Path):
    from bench_loader import random_llama

    import saes
    from workbench.models import load_model
    from workbench.steering import SteeringSpec, steer

    loaded = load_model(str(random_llama(tmp / "steer-lm", s.llama_d, 2)), device=device, dtype="float32")
    sae = saes.build(saes.SAEConfig(d_in=s.llama_d, width=s.width // 8, k=s.k // 2))
    sae_dir = tmp / "steer-sae"
    saes.save_sae(sae, sae_dir)
    spec = SteeringSpec.single(source=str(sae_dir), index=3, strength=4.0, unit="raw", hook=HOOK)
    tokens = torch.randint(0, 1000, (2, 32), device=device)
    with steer(loaded.model, spec):
        loaded.model(tokens)  # warm-up: resolving the spec may read values once
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            loaded.model(tokens)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    return (True if device.type == "cuda" else None), "a steered forward ran with sync debug mode 'error'" if device.type == "cuda" \
        else "ran (sync debug mode is CUDA only)"


# -- (h) the Parquet store on this device --------------------------------------------------------
def shard_store(device: torch.device, s: Shapes, out: dict, tmp: Path):
    from bench_loader import random_llama

    from workbench.caching import run_cache

    lm = random_llama(tmp / "shard-lm", s.llama_d, 2)
    db, started = tmp / "shards.duckdb", time.perf_counter()
    run_cache(db=db, model=str(lm), hooks=[HOOK], corpus="stdlib", tokens=s.cache_tokens, ctx=s.ctx, batch=32, device=str(device),
              progress=False, store="parquet", commit_contexts=256)
    cached = s.cache_tokens / (time.perf_counter() - started)
    rate = loader_rate(db, s.batch, device)
    need = out.get("trainer_tokens_per_s")
    figure = (f"cache into shards {cached / 1e3:,.1f} K tok/s (model load included), loader from shards {rate / 1e3:,.0f} K rows/s "
              f"at d {s.llama_d} into {device}" + (f", {rate / need:.2f}x the trainer's {need / 1e3:,.0f} K tok/s" if need else ""))
    return (rate >= need) if (need and device.type == "cuda") else None, figure


# -- (g) the gpu-marked tests -----------------------------------------------------------------
def gpu_tests(device: torch.device):
    if device.type != "cuda":
        return None, "CUDA only"
    files = sorted(str(p) for p in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())
    # -P: the checkout must not shadow the installed package (workbench.data exists only once installed)
    done = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, capture_output=True, text=True, timeout=150)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return done.returncode == 0, summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="toy shapes (runs on the CPU too)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--only", default="", help="comma-separated check letters, e.g. a,b")
    p.add_argument("--budget", type=float, default=390, help="seconds after which no further check starts")
    args = p.parse_args(argv)
    import saes

    device = saes.resolve_device(args.device)
    s = SMOKE if args.smoke else FULL
    only = set(filter(None, args.only.split(",")))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {device} ({name}), torch {torch.__version__}, {'smoke' if args.smoke else 'full'} shapes", flush=True)
    check, shared = Check(args.budget), {}
    check.run("(0) packages", packages)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        tmp = Path(folder)
        if not only or "a" in only:
            for arch in trainable():
                check.run(f"(a) fast path {arch}", fast_path, arch, device, s)
        if not only or "b" in only:
            for arch in trainable():
                check.run(f"(b) syncs {arch}", syncs_per_step, arch, device, s)
        if not only or "c" in only:
            check.run("(c) training speed", train_speed, device, s, shared)
        if not only or "d" in only:
            check.run("(d) loader", loader, device, s, shared, tmp)
        if not only or "e" in only:
            check.run("(e) caching", caching, device, s, tmp)
        if not only or "f" in only:
            check.run("(f) steering hooks", steering, device, s, tmp)
        if not only or "h" in only:
            check.run("(h) Parquet shards", shard_store, device, s, shared, tmp)
        if not only or "g" in only:
            check.run("(g) gpu-marked tests", gpu_tests, device)
    print(f"{check.failed} check(s) failed" if check.failed else "all checks passed or skipped", flush=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
