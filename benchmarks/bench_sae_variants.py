"""TopK vs BatchTopK vs Feature Choice vs Mutual Choice on real activations of the default model.

    python benchmarks/bench_sae_variants.py [--db workspaces/variants.duckdb] [--cache-tokens 204800]
        [--train-tokens 1048576] [--width 4608] [--ks 16 32 64] [--archs topk batchtopk feature_choice mutual_choice]

Caches ``--cache-tokens`` of the ``stdlib`` corpus at ``blocks.15.hook_resid_post`` of
SmolLM2-135M (resumable; reused on a rerun), then trains every (arch, k) with the same width,
token budget, seed and batch order, and prints the held-out metrics of each in their
batch-independent inference form: L0, FVU, dead %, CE loss recovered and KL with the
reconstruction spliced in. Finished SAEs are reused, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
from pathlib import Path

MODEL, HOOK = "smollm2-135m", "blocks.15.hook_resid_post"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("workspaces/variants.duckdb"))
    parser.add_argument("--cache-tokens", type=int, default=204_800)
    parser.add_argument("--train-tokens", type=int, default=1_048_576)
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--archs", nargs="+", default=["topk", "batchtopk", "feature_choice", "mutual_choice"])
    args = parser.parse_args()

    import saes
    from workbench.caching import run_cache
    from workbench.cli import quiet_third_party
    from workbench.cli.core import model_for_run
    from workbench.training import train_sae, trained_saes
    from workbench.workspace import Workspace

    quiet_third_party()
    args.db.parent.mkdir(parents=True, exist_ok=True)
    run_cache(db=args.db, model=MODEL, hooks=[HOOK], corpus="stdlib", tokens=args.cache_tokens, ctx=128)
    with Workspace(args.db) as ws:
        model = model_for_run(ws, HOOK, None, argparse.Namespace(device="cpu", model_dtype=None))
        done = {row["name"] for row in trained_saes(ws) if row["status"] == "done"}
        for k in args.ks:
            for arch in args.archs:
                name = f"{arch}-w{args.width}-k{k}"
                if name in done:
                    continue
                train_cfg = saes.TrainConfig(total_tokens=args.train_tokens, batch_size=4096, bf16_autocast=True,
                                             checkpoint_every=50, seed=0)
                train_sae(ws, HOOK, dict(arch=arch, width=args.width, k=k), train_cfg, name=name, model=model)
        results = {row["name"]: row for row in trained_saes(ws)}

    print(f"\n{MODEL} {HOOK}: {args.cache_tokens:,} cached tokens, width {args.width}, "
          f"{args.train_tokens:,} training tokens each, metrics on the held-out 5 %")
    print(f"{'k':>3}  {'arch':<15}{'L0':>8}{'FVU':>8}{'dead %':>8}{'CE rec.':>9}{'KL':>8}")
    for k in args.ks:
        for arch in args.archs:
            m = results[f"{arch}-w{args.width}-k{k}"]["metrics"]
            print(f"{k:>3}  {arch:<15}{m['l0']:8.1f}{m['fvu']:8.4f}{100 * m['dead_fraction']:8.2f}"
                  f"{m['ce_loss_recovered']:9.4f}{m['kl_clean_spliced']:8.4f}")


if __name__ == "__main__":
    main()
