"""Steering curves and generation speed on the default model with a trained SAE.

    python benchmarks/bench_steering.py [--db workspaces/default.duckdb] [--sae demo-topk]
        [--features 5] [--strengths 0 0.5 1 2 4 8] [--unit feature_p99] [--new-tokens 32] [--repeats 3]

Takes an SAE of a workspace (the demo's ``demo-topk`` by default). Without the workspace file,
it builds a small one in a temporary folder first (32,768 cached tokens of ``stdlib`` at
``blocks.15.hook_resid_post``, a TopK SAE of width 2,304, k 32 trained on 262,144 tokens). A
workspace at an older schema version is copied to a temporary folder and migrated there; the
original is only read.

1. Picks the ``--features`` features with the clearest logit effect ((d̂ ⊙ γ) W_Uᵀ): the largest top
   effect in standard deviations of the feature's effect over the vocabulary (``--rank z``), or the
   largest raw top effect (``--rank raw``), among features firing on at least 20 cached tokens.
2. For each, ``add`` at increasing strengths (in ``--unit`` of the feature's own scale) and prints
   the curve: the feature's activation at the hook, Δ log P(its top-10 promoted tokens) on a few
   prompts, and KL(baseline ‖ steered) on held-out cached contexts (the side-effect cost).
3. One baseline/steered pair of greedy generations for the first feature, and greedy generation
   tokens/s (KV cache) without hooks, with its ``add`` hook and with its ``clamp`` hook.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL, HOOK = "smollm2-135m", "blocks.15.hook_resid_post"
PROMPTS = (
    "The most important thing to remember is",
    "def main():\n    ",
    "Once upon a time, in a small village,",
    "The results of the experiment show that",
)


def open_workspace(db: Path, sae: str, tmp: Path):
    """The workspace read-only; a copy migrated in ``tmp`` when it has an older schema; a fresh one when missing."""
    from workbench.workspace import Workspace, WorkspaceError

    if not db.exists():
        return build_workspace(tmp / "steer.duckdb", sae)
    try:
        return Workspace(db, read_only=True)
    except WorkspaceError as err:
        if "schema version" not in str(err):
            raise
    copy = tmp / db.name
    print(f"{db} has an older schema: copying it to {copy} and migrating the copy", file=sys.stderr)
    shutil.copy2(db, copy)
    Workspace(copy).close()  # migrates
    return Workspace(copy, read_only=True)


def build_workspace(db: Path, sae: str):
    import saes
    from workbench.caching import run_cache
    from workbench.training import train_sae
    from workbench.workspace import Workspace

    print(f"no workspace given: building {db} (cache 32,768 tokens, train a TopK SAE '{sae}')", file=sys.stderr)
    run_cache(db=db, model=MODEL, hooks=[HOOK], corpus="stdlib", tokens=32_768, ctx=128)
    with Workspace(db) as ws:
        cfg = saes.TrainConfig(total_tokens=262_144, batch_size=4096, bf16_autocast=True, checkpoint_every=50)
        train_sae(ws, HOOK, dict(arch="topk", width=2304, k=32), cfg, name=sae, model=None)
    return Workspace(db, read_only=True)


def pick_features(model, sae, stats, n: int, rank: str) -> list[tuple[int, float, float, list[int]]]:
    """(feature, top logit effect, its z-score, top-10 token ids) of the ``n`` features ranked by ``rank``.

    ``raw``: the largest top logit effect. ``z`` (default): the top effect in standard deviations of
    that feature's effect over the vocabulary — the raw maximum favours a few word-fragment tokens
    with a large γ-scaled unembedding (' strugg', ' affili', ...) that top most features' lists.
    """
    from workbench.steering import logit_effect

    directions = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)  # (F, d)
    values, ids, zs = [], [], []
    for start in range(0, directions.shape[0], 256):
        effect = logit_effect(model, directions[start : start + 256])  # (b, vocab)
        top = effect.topk(10, dim=1)
        values.append(top.values)
        ids.append(top.indices)
        zs.append((top.values[:, 0] - effect.mean(1)) / effect.std(1))
    values, ids, zs = torch.cat(values), torch.cat(ids), torch.cat(zs)  # (F, 10), (F, 10), (F,)
    eligible = (stats.fired >= 20) & (stats.p99 > 0)
    score = (values[:, 0] if rank == "raw" else zs).masked_fill(~eligible, float("-inf"))
    chosen = score.topk(n).indices.tolist()
    return [(f, float(values[f, 0]), float(zs[f]), ids[f].tolist()) for f in chosen]


def generation_rates(model, tokens, configs: dict[str, list], new_tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(median, best) tokens/s of greedy KV-cache generation per hook set. Rounds interleave the
    configurations so that load from other processes falls on all of them alike; the best round
    is the least disturbed one."""
    from workbench.hooks import attached
    from workbench.steering import generate_tokens

    rates: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(repeats + 1):
        for name, hooks in configs.items():
            with attached(model, hooks):
                start = time.perf_counter()
                out = generate_tokens(model, tokens, max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
                rate = out.numel() / (time.perf_counter() - start)
            if round_:  # round 0 warms up
                rates[name].append(rate)
    return {name: (statistics.median(r), max(r)) for name, r in rates.items()}


def hook_call_us(fn, d: int, calls: int = 200) -> float:
    """Microseconds per call of a steering hook on one new position (1, 1, d)."""
    act = torch.randn(1, 1, d)
    fn(act)
    start = time.perf_counter()
    for _ in range(calls):
        fn(act)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("workspaces/default.duckdb"))
    parser.add_argument("--sae", default="demo-topk")
    parser.add_argument("--features", type=int, default=5)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0, 0.5, 1, 2, 4, 8])
    parser.add_argument("--unit", default="feature_p99", choices=["feature_p99", "feature_max"])
    parser.add_argument("--neutral", type=int, default=4, help="held-out contexts (64 tokens each) for the KL")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-curves", action="store_true", help="only the generations and the speed")
    parser.add_argument("--rank", choices=["z", "raw"], default="z", help="feature choice: z-score or raw top logit effect")
    args = parser.parse_args()

    from workbench.cli import quiet_third_party
    from workbench.hooks import attached
    from workbench.models import load_model
    from workbench.steering import (
        Intervention,
        SteeringSpec,
        feature_scale_stats,
        generate,
        load_steering_sae,
        neutral_from_workspace,
        resolve_spec,
        sweep,
    )

    quiet_third_party()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ws = open_workspace(args.db, args.sae, Path(tmp))
        try:
            ref = load_steering_sae(args.sae, ws)
            hook = ref.hook
            (model_name,) = ws.query("SELECT r.model FROM saes s JOIN runs r USING (run_id) WHERE s.name = ?", [ref.label])[0]
            loaded = load_model(model_name, device="cpu")
            model = loaded.model
            start = time.perf_counter()
            stats = feature_scale_stats(ws, ref.sae, hook)
            scale_s = time.perf_counter() - start
            neutral = neutral_from_workspace(ws, hook, n=args.neutral)
            features = pick_features(model, ref.sae, stats, args.features, args.rank)
            norms = []
            with attached(model, [(hook, lambda a, hook=None: norms.append(a[0, 1:].norm(dim=-1)))]):
                for text in neutral:
                    model(text[None])
            resid = float(torch.cat(norms).mean())
            print(f"{model_name} {hook}, SAE '{ref.label}' ({ref.sae.cfg.arch}, width {ref.sae.cfg.width}); feature scales from "
                  f"{stats.n_tokens:,} cached tokens in {scale_s:.1f} s; {len(PROMPTS)} prompts, "
                  f"{len(neutral)} held-out contexts × {neutral[0].numel()} tokens for the KL; strengths in {args.unit}; "
                  f"mean ‖x‖ at the hook {resid:.1f} (positions ≥ 1)")
            decode = loaded.tokenizer.decode
            for feature, top_effect, top_z, top_ids in ([] if args.no_curves else features):
                spec = SteeringSpec((Intervention(hook=hook, source=ref.label, index=feature, method="add", unit=args.unit),))
                start = time.perf_counter()
                rows = sweep(model, spec, args.strengths, PROMPTS, neutral, ws=ws)
                took = time.perf_counter() - start
                print(f"\nfeature {feature}: max {float(stats.max[feature]):.2f}, p99 {float(stats.p99[feature]):.2f}, "
                      f"fires on {int(stats.fired[feature]):,} tokens; top logit effect {top_effect:.2f} ({top_z:.1f} sd); "
                      f"top tokens {', '.join(repr(decode([t])) for t in top_ids[:6])} ... ({took:.1f} s)")
                print(f"{'strength':>9}{'|added|':>9}{'feat act':>10}{'logP top10':>12}{'Δ logP':>9}{'KL neutral':>12}")
                for row in rows:
                    m = row.metrics
                    added = m["interventions"][0]["amount"] * float(ref.sae.W_dec[feature].norm() / ref.sae.input_scale)
                    print(f"{row.strength:9.2f}{added:9.2f}{m['feature_act_steered']:10.2f}{m['logprob_top_steered']:12.3f}"
                          f"{m['delta_logprob_top']:+9.3f}{m['kl_neutral']:12.4f}")

            first = features[0][0]
            prompt = PROMPTS[0]
            tokens = model.to_tokens(prompt)
            strength = 4.0
            add = SteeringSpec.single(hook=hook, source=ref.label, index=first, method="add", strength=strength, unit=args.unit)
            clamp = SteeringSpec.single(hook=hook, source=ref.label, index=first, method="clamp", strength=strength, unit=args.unit)
            gen = generate(model, prompt, add, max_new_tokens=24, temperature=0, ws=ws)
            print(f"\nfeature {first}, add {strength:g} × {args.unit}, greedy:\n  prompt:   {prompt!r}\n"
                  f"  baseline: {gen.baseline!r}\n  steered:  {gen.steered!r}")
            configs = {"no hooks": []}
            for name, spec in (("add hook", add), ("clamp hook", clamp)):
                configs[name] = [(r.hook, r.fn) for r in resolve_spec(model, spec, ws)]
            rates = generation_rates(model, tokens, configs, args.new_tokens, args.repeats)
            print(f"\ngreedy generation with a KV cache, {args.new_tokens} new tokens, {args.repeats} interleaved rounds, "
                  f"{torch.get_num_threads()} threads (tokens/s; one hook call on a (1, 1, d) activation):")
            base_median, base_best = rates["no hooks"]
            for name, (median, best) in rates.items():
                call = f"{hook_call_us(configs[name][0][1], ref.sae.cfg.d_in):8.0f} µs/call" if configs[name] else ""
                print(f"  {name:<11} median {median:7.1f} ({median / base_median:.2f}×)   "
                      f"best {best:7.1f} ({best / base_best:.2f}×) {call}")
        finally:
            ws.close()


if __name__ == "__main__":
    main()
