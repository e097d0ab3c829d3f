"""Caching throughput against a bare forward, model load times, and bytes on disk.

    python benchmarks/bench_cache.py [--model smollm2-135m] [--hook blocks.15.hook_resid_post]
                                     [--contexts 64] [--ctx 128] [--batch 16] [--repeats 2]

All three paths run in this one process over the same batches, alternating, best of
``--repeats``; the ratios are what to read (absolute times on shared machines are noisy):

- bare:   the Hugging Face model's own forward with its layer list cut after the hook's block;
- bridge: the TransformerBridge forward with ``stop_at_layer`` and the capture hook, no writes;
- cache:  the ``ActivationCacher`` job (forward, float16 conversion, Arrow batches, DuckDB
          transactions) extending a run, so one-time set-up is reported on its own line.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="blocks.15.hook_resid_post")
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from workbench.cli import quiet_third_party

    quiet_third_party()
    from workbench.caching import ActivationCacher, CacheRequest, _Capture
    from workbench.data import chunk_and_tokenize, load_corpus
    from workbench.hooks import attached, layer_of, stop_layer
    from workbench.models import load_model
    from workbench.workspace import Workspace

    # -- model load: cold (convert into an empty cache) vs warm ------------------------------
    with tempfile.TemporaryDirectory() as cold_cache:
        previous = os.environ.get("WORKBENCH_CACHE")
        os.environ["WORKBENCH_CACHE"] = cold_cache
        cold = best_of(1, lambda: load_model(args.model, device="cpu"))
        if previous is None:
            del os.environ["WORKBENCH_CACHE"]
        else:
            os.environ["WORKBENCH_CACHE"] = previous
    load_model(args.model, device="cpu")  # make sure the user cache is populated
    warm = best_of(3, lambda: load_model(args.model, device="cpu"))

    loaded = load_model(args.model, device="cpu")
    corpus = load_corpus("stdlib")
    contexts = list(chunk_and_tokenize(corpus.documents, loaded.tokenizer, args.ctx, seed=0, max_contexts=args.contexts))
    batches = [torch.tensor([c.token_ids for c in contexts[i : i + args.batch]]) for i in range(0, len(contexts), args.batch)]
    n_tokens = sum(b.numel() for b in batches)

    hf = loaded.model.original_model
    layers = hf.model.layers
    keep = layer_of(args.hook) + 1

    def bare() -> None:
        hf.model.layers = layers[:keep]
        try:
            with torch.inference_mode():
                for b in batches:
                    hf.model(input_ids=b, use_cache=False)
        finally:
            hf.model.layers = layers

    stop = stop_layer([args.hook], loaded.model.cfg.n_layers)
    capture = _Capture([args.hook])

    def bridge() -> None:
        with torch.inference_mode(), attached(loaded.model, capture.fwd_hooks()):
            for b in batches:
                loaded.model(b, stop_at_layer=stop)

    sizes = {}
    setup_times = []

    def cache() -> None:
        """Steady state: a run that already holds one batch is extended by the benchmark's tokens.
        The one-time set-up (run row, vocabulary, corpus fingerprint) is timed separately."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.duckdb"

            def request(tokens: int) -> CacheRequest:
                return CacheRequest(model=args.model, hooks=(args.hook,), corpus="stdlib", tokens=tokens,
                                    ctx_len=args.ctx, batch_size=args.batch)

            first = args.batch * args.ctx
            with Workspace(path) as ws:
                start = time.perf_counter()
                ActivationCacher(ws, loaded, corpus, request(first)).run(progress=False)
                first_call = time.perf_counter() - start
                start = time.perf_counter()
                summary = ActivationCacher(ws, loaded, corpus, request(first + n_tokens)).run(progress=False)
                timings.append(time.perf_counter() - start)
                setup_times.append(first_call - timings[-1] / len(batches))  # minus its one batch of work
            sizes["file"] = path.stat().st_size / summary.n_tokens
            sizes["activations"] = summary.bytes_per_token

    timings: list[float] = []

    results: dict[str, list[float]] = {"bare": [], "bridge": []}  # cache() appends to timings
    for _ in range(args.repeats):  # alternate so drifting machine load hits all three alike
        for name, fn in (("bare", bare), ("bridge", bridge)):
            results[name].append(best_of(1, fn))
        cache()
    results["cache"] = timings
    best = {name: min(times) for name, times in results.items()}

    print(f"model {args.model}, hook {args.hook}, {n_tokens:,} tokens in batches of {args.batch}x{args.ctx}, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    for name in ("bare", "bridge", "cache"):
        print(f"  {name:<7} {n_tokens / best[name]:9.0f} tok/s   {best[name] / best['bare']:.3f}x bare time")
    print(f"  caching overhead over the bare truncated forward: {100 * (best['cache'] / best['bare'] - 1):+.1f}% "
          f"(steady state), plus {min(setup_times):.2f} s once per run (vocabulary, corpus fingerprint, run row)")
    print(f"  model load: cold {cold:.1f} s (dequantise + save), warm {warm:.2f} s  ->  {cold / warm:.0f}x")
    print(f"  bytes per cached token: {sizes['activations']:.0f} activation bytes (d={loaded.model.cfg.d_model} x 2), "
          f"{sizes['file']:.0f} bytes of workspace file in all (tokens, documents and vocabulary included)")


if __name__ == "__main__":
    main()
