"""Scale-out benchmark: both stores, one and two processes, side by side in one run.

    python benchmarks/bench_scale.py [--tokens 10000000] [--sample 1048576] [--width 576] [--layers 2]
        [--sae-width 2048] [--k 16] [--train-tokens 2097152] [--pages 50] [--out workspaces/scale]

Through a random 2-layer Llama at d 576 (the forward is cheap, so storage dominates) over the
built-in corpus repeated until it holds ``--tokens`` (a storage benchmark: what the text says does
not matter), it prints:

- caching tokens/s of ``--sample`` tokens (the model in bfloat16): the bare truncated forward
  (reference), the DuckDB store with one process, the Parquet store with one and with two
  processes (``torchrun``); wall-clock from the command's start, so model loading and
  tokenisation count;
- bytes on disk per token (and hook) in each store;
- loader rows/s (``iter_activations``, batches of 4,096 on the CPU) from each store;
- training tokens/s (TopK) with one and with two processes (DDP on gloo) from the shards;
- then ``--tokens`` (≥ 10 M) cached by two processes into shards, ``analyze`` tokens/s over all
  of them, and the feature page's queries (median, p95) over ``--pages`` random live features
  there (target ≤ 200 ms).

On a 2-core machine two processes cannot add compute: the two-process figures show that nothing
in the path is bound to one writer, not a speed-up. Disk: about (tokens + 3 × sample) × 2 bytes ×
width, plus the feature store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HOOK = "blocks.1.hook_resid_post"
CTX = 128


def repeated_corpus(path: Path, tokens: int) -> Path:
    """The built-in corpus written as .jsonl, repeated until it holds about ``tokens`` tokens (≈ 4 M per copy)."""
    from workbench.data import load_corpus

    documents = load_corpus("stdlib").documents
    copies = max(1, -(-tokens // 3_500_000))
    with path.open("w") as f:
        for copy in range(copies):
            for doc in documents:
                f.write(json.dumps({"text": doc.text, "domain": doc.domain}) + "\n")
    return path


def run(argv: list[str], nproc: int = 1) -> float:
    """Seconds of ``workbench argv`` (under torchrun when nproc > 1), from the start of the command."""
    start = time.perf_counter()
    prefix = [sys.executable, "-m", "workbench"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "workbench"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))}
    done = subprocess.run([*prefix, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"workbench {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def bare_forward(model_dir: Path, tokens: int) -> float:
    """Tokens/s of the truncated HF forward to the hook's block in bfloat16 (no hooks, no writes), as caching runs it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    batch = torch.randint(0, model.config.vocab_size, (16, CTX))
    layers = model.model.layers
    model.model.layers = layers[:2]
    with torch.inference_mode():
        model.model(batch)  # warm-up
        start, done = time.perf_counter(), 0
        while done < tokens:
            model.model(batch)
            done += batch.numel()
    model.model.layers = layers
    return done / (time.perf_counter() - start)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def loader_rate(db: Path, seconds: float = 20.0) -> float:
    from workbench.activations import iter_activations
    from workbench.workspace import Workspace

    with Workspace(db, read_only=True) as ws:
        batches = iter_activations(ws, HOOK, 4096, device="cpu")
        next(batches)  # the reader thread is running
        start, rows = time.perf_counter(), 0
        for batch in batches:
            rows += batch.shape[0]
            if time.perf_counter() - start > seconds:
                break
        rate = rows / (time.perf_counter() - start)
        batches.close()
    return rate


def training_rate(db: Path, name: str) -> float:
    """The last logged tokens/s of an SAE's training (steady state: after start-up)."""
    from workbench.workspace import Workspace

    with Workspace(db, read_only=True) as ws:
        (line,) = ws.query("SELECT l.metrics FROM training_log l JOIN saes s USING (sae_id) WHERE s.name = ? ORDER BY l.step DESC LIMIT 1",
                           [name])[0]
    return float(json.loads(line)["tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--sample", type=int, default=1_048_576, help="tokens of the one-process store comparison")
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sae-width", type=int, default=2048)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--train-tokens", type=int, default=2_097_152)
    parser.add_argument("--pages", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("workspaces/scale"))
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_feature_store import page_latency
    from bench_loader import random_llama

    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    lm = random_llama(out / "lm", args.width, args.layers)
    corpus = repeated_corpus(out / "corpus.jsonl", args.tokens)
    common = ["--model", str(lm), "--hook", HOOK, "--corpus", str(corpus), "--ctx", str(CTX), "--batch", "32", "--device", "cpu",
              "--model-dtype", "bfloat16"]  # bf16 matmuls run 2-3x faster than fp32 on these CPUs (AMX / AVX-512)
    rows: list[tuple[str, str]] = []

    def report(label: str, value: str) -> None:
        rows.append((label, value))
        print(f"  {label:<58} {value}", flush=True)

    print(f"random Llama d={args.width}, {args.layers} layers, hook {HOOK}, ctx {CTX}; {torch.get_num_threads()} threads")
    forward = bare_forward(lm, 262_144)
    report("bare truncated forward", f"{forward:,.0f} tokens/s")

    sample = {"duckdb, 1 process": (out / "duck.duckdb", "duckdb", 1), "parquet, 1 process": (out / "pq1.duckdb", "parquet", 1),
              "parquet, 2 processes": (out / "pq2.duckdb", "parquet", 2)}
    for label, (db, store, nproc) in sample.items():
        seconds = run(["cache", *common, "--tokens", str(args.sample), "--db", str(db), "--store", store], nproc=nproc)
        report(f"cache {args.sample:,} tokens, {label}", f"{args.sample / seconds:,.0f} tokens/s "
               f"({args.sample / seconds / forward:.2f}× the bare forward; start-up included)")
    duck, pq1 = sample["duckdb, 1 process"][0], sample["parquet, 1 process"][0]
    report("bytes per token, duckdb store (whole file)", f"{folder_bytes(duck) / args.sample:,.0f}")
    report("bytes per token, parquet store (shards + workspace file)",
           f"{(folder_bytes(pq1.with_suffix('.shards')) + folder_bytes(pq1)) / args.sample:,.0f} "
           f"(shards {folder_bytes(pq1.with_suffix('.shards')) / args.sample:,.0f})")
    for label, db in (("duckdb", duck), ("parquet", pq1)):
        report(f"loader rows/s, {label} store", f"{loader_rate(db):,.0f}")

    train = ["train", "--db", str(pq1), "--hook", HOOK, "--arch", "topk", "--width", str(args.sae_width), "--k", str(args.k),
             "--tokens", str(args.train_tokens), "--batch-size", "4096", "--no-downstream", "--device", "cpu"]
    for nproc in (1, 2):
        run([*train, "--name", f"sae{nproc}"], nproc=nproc)
        report(f"train TopK w{args.sae_width} k{args.k} from shards, {nproc} process{'es' if nproc > 1 else ''}",
               f"{training_rate(pq1, f'sae{nproc}'):,.0f} tokens/s")

    big = out / "big.duckdb"  # the scale the issue asks for: cached by two processes, analysed whole
    seconds = run(["cache", *common, "--tokens", str(args.tokens), "--db", str(big), "--store", "parquet", "--commit-contexts", "512"],
                  nproc=2)
    report(f"cache {args.tokens:,} tokens, parquet, 2 processes", f"{args.tokens / seconds:,.0f} tokens/s ({seconds:.0f} s)")
    run([*train[:2], str(big), *train[3:], "--name", "big"])
    seconds = run(["analyze", "--db", str(big), "--sae", "big", "--device", "cpu"])
    report(f"analyze {args.tokens:,} tokens from shards", f"{args.tokens / seconds:,.0f} tokens/s ({seconds:.0f} s)")
    timings = page_latency(big, "big", args.pages)
    p95 = timings[int(0.95 * (len(timings) - 1))]
    report(f"feature page at {args.tokens:,} tokens, {len(timings)} random live features",
           f"median {1000 * statistics.median(timings):.0f} ms, p95 {1000 * p95:.0f} ms (target ≤ 200 ms)")


if __name__ == "__main__":
    main()
