"""Code steering on the default model: Jensen–Shannon divergence of the next-token distribution
when a codebook code is forced, as in the codebook-features paper (Tamkin, Taufeeque & Goodman 2023).

    python benchmarks/bench_steering_codes.py [--db workspaces/default.duckdb] [--codebook NAME|DIR]
        [--width 1024] [--k 8] [--tokens 524288] [--codes 6] [--neutral 4] [--out DIR] [--retrain]

1. The codebook: ``--codebook`` (a workspace SAE name or a folder), else a finished ``codebook`` in
   the workspace at the cached hook, else one trained earlier into ``--out``, else it trains one there
   (``saes.train`` on the workspace's cached training split, read-only: the workspace is never written;
   ~1 min on 2 CPU cores) and reports its held-out FVU and code usage.
2. Picks ``--codes`` codes used on at least 20 cached tokens: half the most used ones, then those with
   the clearest direct logit effect (top effect in standard deviations over the vocabulary).
3. For each code and each ``code_mode`` (``replace_lowest``: the code takes the lowest-scoring
   selected slot; ``replace_all``: all k slots, only that code active) measures, teacher-forced,
   JS(p_baseline, p_forced) and KL on held-out cached contexts (nats per position, every position)
   and Δ log P of the code's top logit-effect tokens on a few prompts (``steering.measure``).
   Baseline = the unmodified model: a forced code changes x by x̂(z') − x̂(z) only (error term kept).
4. References on the same contexts: JS of the baseline with itself (0), and of the codebook spliced
   in without forcing (x → x̂(z), no error term: the cost of the bottleneck itself).
5. Greedy baseline and forced generations (both modes) for the code with the largest replace_all JS.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_steering import PROMPTS, open_workspace  # noqa: E402  (same prompts, same workspace handling)


def find_codebook(ws, hook: str, args, out: Path):
    """(module, label, how it was obtained) of the codebook to steer with."""
    from workbench.steering import load_steering_sae

    if args.codebook:
        ref = load_steering_sae(args.codebook, ws)
        return ref.sae, ref.label, "given"
    rows = ws.query("SELECT name FROM saes WHERE status = 'done' AND arch = 'codebook' AND hook = ? ORDER BY sae_id", [hook])
    if rows:
        ref = load_steering_sae(rows[-1][0], ws)
        return ref.sae, ref.label, "from the workspace"
    if (out / "cfg.json").is_file() and not args.retrain:
        ref = load_steering_sae(str(out), ws)
        return ref.sae, str(out), "trained earlier"
    return train_codebook(ws, hook, args, out), str(out), "trained now"


def train_codebook(ws, hook: str, args, out: Path):
    import saes
    from workbench.activations import iter_activations
    from workbench.training import hook_dim, train_tokens_available

    run_id = ws.resolve_hook_run(hook)
    cfg = saes.SAEConfig(d_in=hook_dim(ws, run_id, hook), width=args.width, k=args.k, arch="codebook")
    tc = saes.TrainConfig(total_tokens=args.tokens, batch_size=4096, warmup_steps=10, seed=0, log_every=16)
    epochs = math.ceil(args.tokens / train_tokens_available(ws, run_id, hook)) + 1
    print(f"training a codebook (N={args.width}, k={args.k}, sum of codes) on {args.tokens:,} tokens of {hook} "
          f"(read-only) into {out}", file=sys.stderr)
    start = time.perf_counter()
    batches = iter_activations(ws, hook, tc.batch_size, seed=0, run_id=run_id, split="train", epochs=epochs)
    with torch.enable_grad():  # main() turns gradients off for everything else
        result = saes.train(cfg, tc, batches)
    saes.save_sae(result.sae, out)
    print(f"trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    from workbench.steering import load_steering_sae

    return load_steering_sae(str(out), ws).sae


def usage_counts(ws, hook: str, cb, n_tokens: int = 32_768) -> tuple[torch.Tensor, int]:
    """(N,) tokens on which each code is selected, over up to ``n_tokens`` cached tokens."""
    from workbench.activations import iter_activations

    counts, n = torch.zeros(cb.cfg.width, dtype=torch.long), 0
    with torch.inference_mode():
        for batch in iter_activations(ws, hook, 4096, seed=0, split="all", drop_last=False):
            counts += (cb.encode(batch) > 0).sum(0)
            n += batch.shape[0]
            if n >= n_tokens:
                break
    return counts, n


def pick_codes(model, cb, counts: torch.Tensor, n: int) -> list[int]:
    from workbench.steering import decoder_vectors, logit_effect

    eligible = counts >= 20
    effect = logit_effect(model, torch.nn.functional.normalize(decoder_vectors(cb).detach().float(), dim=1))  # (N, vocab)
    z = ((effect.max(1).values - effect.mean(1)) / effect.std(1)).masked_fill(~eligible, float("-inf"))  # (N,)
    used = counts.float().masked_fill(~eligible, -1)  # (N,)
    chosen = [c for c in used.topk(cb.cfg.width).indices.tolist() if bool(eligible[c])][: (n + 1) // 2]  # the most used
    for c in z.topk(cb.cfg.width).indices.tolist():  # then the clearest logit effects
        if len(chosen) >= n or not bool(eligible[c]):
            break
        if c not in chosen:
            chosen.append(c)
    return chosen[:n]


def splice_js(model, hook: str, cb, neutral) -> float:
    """Mean JS(p_baseline, p_spliced) with x → x̂(z) at every position (no error term)."""
    from workbench.hooks import attached
    from workbench.steering import js_divergence

    def splice(act, hook=None):
        x = act.reshape(-1, act.shape[-1])  # (N, d)
        return cb.decode(cb.encode(x)).to(act.dtype).reshape(act.shape)

    values = []
    with torch.inference_mode():
        for tokens in neutral:
            base = model(tokens[None])[0].float().log_softmax(-1)  # (L, vocab)
            with attached(model, [(hook, splice)]):
                spliced = model(tokens[None])[0].float().log_softmax(-1)
            values.append(js_divergence(base, spliced))
    return float(torch.cat(values).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("workspaces/default.duckdb"))
    parser.add_argument("--sae", default="demo-topk", help="only used to build a workspace when --db is missing")
    parser.add_argument("--codebook", default=None, help="a workspace codebook name or a codebook folder")
    parser.add_argument("--width", type=int, default=1024, help="codes N when training")
    parser.add_argument("--k", type=int, default=8, help="codes per token when training")
    parser.add_argument("--tokens", type=int, default=524_288, help="training tokens")
    parser.add_argument("--out", type=Path, default=None, help="where a trained codebook is kept (default: a temp folder per workspace)")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--codes", type=int, default=4)
    parser.add_argument("--neutral", type=int, default=4, help="held-out contexts (64 tokens each) for JS and KL")
    parser.add_argument("--strength", type=float, default=1.0, help="the forced code's strength (1: as the codebook weighs a code)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from saes.evals import reconstruction_metrics
    from workbench.activations import iter_activations
    from workbench.cli import quiet_third_party
    from workbench.models import load_model
    from workbench.steering import CODE_MODES, SteeringSpec, generate, js_divergence, measure, neutral_from_workspace

    quiet_third_party()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ws = open_workspace(args.db, args.sae, Path(tmp))
        try:
            (hook, model_name) = ws.query("SELECT h.hook, r.model FROM run_hooks h JOIN runs r USING (run_id) ORDER BY r.run_id LIMIT 1")[0]
            tag = hashlib.sha1(str(args.db.resolve()).encode()).hexdigest()[:8]
            out = args.out or Path(tempfile.gettempdir()) / "workbench-bench" / (f"{args.db.stem}-{tag}-codebook-"
                                                                                 f"n{args.width}-k{args.k}-t{args.tokens}")
            cb, label, how = find_codebook(ws, hook, args, out)
            cb.eval()
            held_out = iter_activations(ws, hook, 4096, seed=0, split="test", drop_last=False)
            rec = reconstruction_metrics(cb, held_out)
            counts, n_counted = usage_counts(ws, hook, cb)
            loaded = load_model(model_name, device="cpu")
            model = loaded.model
            neutral = neutral_from_workspace(ws, hook, n=args.neutral)
            print(f"{model_name} {hook}; codebook {label} ({how}): N={cb.cfg.width} codes, k={cb.cfg.k}, "
                  f"{cb.cfg.codebook_combine} of codes; held-out FVU {rec['fvu']:.3f}; "
                  f"{int((counts > 0).sum())}/{cb.cfg.width} codes used on {n_counted:,} cached tokens")
            print(f"JS/KL: nats per position over {len(neutral)} held-out contexts × {neutral[0].numel()} tokens "
                  f"(JS ≤ ln 2 = {math.log(2):.3f}); Δ log P: the code's top-10 logit-effect tokens on {len(PROMPTS)} prompts; "
                  f"strength {args.strength:g}")

            self_js = float(torch.cat([js_divergence(l, l) for l in
                                       (model(t[None])[0].float().log_softmax(-1) for t in neutral)]).mean())
            print(f"reference: JS(baseline, baseline) = {self_js:.6f}; JS(baseline, codebook spliced in, no forcing, "
                  f"no error term) = {splice_js(model, hook, cb, neutral):.4f}")

            codes = pick_codes(model, cb, counts, args.codes)
            print(f"\n{'code':>6}{'used on':>9}  {'mode':<15}{'JS':>9}{'KL':>9}{'Δ logP':>9}  top tokens")
            best, best_js = None, -1.0
            baseline: dict = {}  # the unsteered forwards, shared by every code and mode
            for code in codes:
                for mode in CODE_MODES:
                    spec = SteeringSpec.single(hook=hook, source=label, index=code, method="code", strength=args.strength,
                                               code_mode=mode)
                    m = measure(model, spec, PROMPTS, neutral, ws=ws, baseline_cache=baseline)
                    tokens = ", ".join(repr(t) for t in m["top_tokens"][:4])
                    print(f"{code:>6}{int(counts[code]) / n_counted:>9.2%}  {mode:<15}{m['js_neutral']:9.4f}"
                          f"{m['kl_neutral']:9.4f}{m['delta_logprob_top']:+9.3f}  {tokens}")
                    if mode == "replace_all" and m["js_neutral"] > best_js:
                        best, best_js = code, m["js_neutral"]
            if best is not None:
                print(f"\ncode {best} forced, greedy, prompt {PROMPTS[0]!r}:")
                for mode in CODE_MODES:
                    spec = SteeringSpec.single(hook=hook, source=label, index=best, method="code", strength=args.strength,
                                               code_mode=mode)
                    gen = generate(model, PROMPTS[0], spec, max_new_tokens=24, temperature=0, ws=ws)
                    if mode == CODE_MODES[0]:
                        print(f"  baseline:        {gen.baseline!r}")
                    print(f"  {mode + ':':<16} {gen.steered!r}")
        finally:
            ws.close()


if __name__ == "__main__":
    main()
