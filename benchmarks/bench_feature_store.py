"""Feature-store scale test: analyze throughput, bytes per stored nonzero, feature-page latency.

    python benchmarks/bench_feature_store.py [--db workspaces/store.duckdb] [--model tiny-llama]
        [--hook blocks.1.hook_resid_post] [--tokens 1048576] [--width 1024] [--k 32] [--pages 50]

Builds (or reuses) a workspace holding ``--tokens`` cached tokens, a TopK SAE and its analysis
(tiny-llama by default, so a million tokens cache in minutes on a CPU; pass the default model's
name to measure it instead), then times what one feature page asks the store for — summary and
histogram, top examples, all quantile bands with their highlighted windows, logit effects,
related features — for ``--pages`` random live features, and reports the median and 95th
percentile latency against the 200 ms target.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path


def page_latency(db: Path, sae: str, pages: int) -> list[float]:
    """Seconds (sorted) of one feature page's queries — summary and histogram, top examples, every
    quantile band, logit effects, related features — for ``pages`` random live features."""
    from workbench import features
    from workbench.workspace import Workspace, resolve_sae

    with Workspace(db, read_only=True) as ws:
        record = resolve_sae(ws, sae)
        live = [f for (f,) in ws.query("SELECT feature FROM feature_stats WHERE sae_id = ? AND n_fired > 0", [record.sae_id])]
        timings = []
        for feature in random.Random(0).sample(live, min(pages, len(live))):
            t0 = time.perf_counter()
            features.feature_summary(ws, record, feature)
            features.examples(ws, record, feature, band=-1)
            features.examples(ws, record, feature, band=None, limit=100)
            features.logit_effects(ws, record, feature)
            features.related_features(ws, record, feature)
            timings.append(time.perf_counter() - t0)
    return sorted(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("workspaces/store.duckdb"))
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--hook", default="blocks.1.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=1_048_576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--pages", type=int, default=50)
    args = parser.parse_args()

    import saes
    from workbench.analysis import analyze
    from workbench.caching import run_cache
    from workbench.cli import quiet_third_party
    from workbench.cli.core import model_for_run
    from workbench.safety import sql_string
    from workbench.training import train_sae
    from workbench.workspace import Workspace

    quiet_third_party()
    args.db.parent.mkdir(parents=True, exist_ok=True)
    run_cache(db=args.db, model=args.model, hooks=[args.hook], corpus="stdlib", tokens=args.tokens, ctx=128, batch=32)
    name = f"store-topk-w{args.width}-k{args.k}"
    with Workspace(args.db) as ws:
        if not ws.query("SELECT count(*) FROM saes WHERE name = ? AND status = 'done'", [name])[0][0]:
            train_sae(ws, args.hook, dict(arch="topk", width=args.width, k=args.k),
                      saes.TrainConfig(total_tokens=2_000_000, batch_size=4096, bf16_autocast=True), name=name)
        model = model_for_run(ws, args.hook, None, argparse.Namespace(device="cpu", model_dtype=None))
        ws.con.execute("DELETE FROM analyses WHERE sae_id = (SELECT sae_id FROM saes WHERE name = ?)", [name])
        start = time.perf_counter()
        summary = analyze(ws, name, model=model)
        elapsed = time.perf_counter() - start
        # Bytes of the nonzero store alone: copy it into a fresh database file and measure that.
        copy = args.db.with_name(args.db.stem + "-store-size.duckdb")
        copy.unlink(missing_ok=True)
        ws.con.execute(f"ATTACH {sql_string(str(copy))} AS sized")
        ws.con.execute("CREATE TABLE sized.feature_acts AS SELECT * FROM feature_acts WHERE sae_id = ? ORDER BY context_id, position",
                       [summary.sae_id])
        ws.con.execute("DETACH sized")
        store_bytes = copy.stat().st_size
        copy.unlink()

    timings = page_latency(args.db, name, args.pages)
    p95 = timings[int(0.95 * (len(timings) - 1))]
    print(f"{args.model} {args.hook}: {summary.n_tokens:,} analysed tokens, {summary.n_nonzeros:,} nonzeros, "
          f"SAE width {args.width}, k {args.k}")
    print(f"  analyze: {summary.n_tokens / elapsed:,.0f} tokens/s ({elapsed:.1f} s, statistics and logit effects included)")
    print(f"  bytes on disk per stored nonzero: {store_bytes / max(1, summary.n_nonzeros):.2f} "
          f"({store_bytes / 2**20:.0f} MiB for the feature_acts rows, DuckDB's own compression)")
    print(f"  feature page ({len(timings)} random live features): median {1000 * statistics.median(timings):.0f} ms, "
          f"p95 {1000 * p95:.0f} ms, max {1000 * timings[-1]:.0f} ms (target ≤ 200 ms)")


if __name__ == "__main__":
    main()
