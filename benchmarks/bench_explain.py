"""How good are the feature labels? Detection and fuzzing against a shuffled control, per explainer.

For N random live features of an analysed SAE (default: the demo workspace, built with
``workbench demo --no-serve`` when missing), each explainer (default: ``pattern`` and
``hf:smollm2-135m``) labels every feature from its training contexts; a judge (default
``hf:default``, the local SmolLM2-135M-Instruct read through its Yes/No log-probabilities) scores
each label by detection and fuzzing on held-out windows (balanced accuracy, 0.5 = chance). The
control scores the same labels shuffled across the features (each feature gets another
feature's label) on the same windows: a label that carries information beats its control.
Also reported: the pattern labels' mean held-out F1 (exact, no judge) and seconds per feature
(labelling, then scoring a label once).

    .venv/bin/python benchmarks/bench_explain.py --n 100
    .venv/bin/python benchmarks/bench_explain.py --n 20 --windows 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def mean(values) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=ROOT / "workspaces" / "default.duckdb")
    parser.add_argument("--sae", default=None, help="SAE name or id (default: the first analysed one)")
    parser.add_argument("--n", type=int, default=100, help="random live features")
    parser.add_argument("--explainers", default="pattern,hf:smollm2-135m")
    parser.add_argument("--judge", default="hf:default", help="hf:MODEL or openai:URL")
    parser.add_argument("--llm-model", default=None, help="model name for an openai:URL explainer or judge")
    parser.add_argument("--windows", type=int, default=5, help="held-out windows per side of each scorer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if not args.db.exists():
        print(f"{args.db} is missing: building it with `workbench demo --no-serve` (minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "workbench", "demo", "--no-serve", "--db", str(args.db)], check=True)

    from workbench.explain_data import load_corpus, load_firing, train_examples
    from workbench.explain_llm import LLMExplainer, LLMJudge, open_llm
    from workbench.explain_pattern import PatternIndex, explain_pattern, held_out_scores
    from workbench.explain_scoring import DetectionScorer, FuzzingScorer, auc, held_out_sample
    from workbench.explanations import check_analysed
    from workbench.workspace import Workspace

    with Workspace(args.db) as ws:  # writable only so that an older schema migrates; nothing is written
        sae = args.sae or ws.query("SELECT sae_id FROM analyses WHERE status = 'done' ORDER BY sae_id")[0][0]
        record = check_analysed(ws, sae)
        live = [f for (f,) in ws.query("SELECT feature FROM feature_stats WHERE sae_id = ? AND n_fired > 0 ORDER BY feature",
                                       [record.sae_id])]
        rng = np.random.default_rng(args.seed)
        features = sorted(rng.choice(live, size=min(args.n, len(live)), replace=False).tolist())
        corpus = load_corpus(ws, record)
        firings = load_firing(ws, record, corpus, features)
    index = PatternIndex(corpus)
    print(f"sae {record.name}: {len(features)} of {len(live)} live features; {int(corpus.test.sum())} held-out contexts "
          f"of {len(corpus.contexts)} × {corpus.ctx_len} tokens", flush=True)

    judge_llm = open_llm(args.judge, llm_model=args.llm_model)
    judge = LLMJudge(judge_llm)
    samples, examples, rules, f1s = {}, {}, {}, {}
    pattern_s = 0.0
    for f in features:
        frng = np.random.default_rng([args.seed, f])
        started = time.perf_counter()
        rules[f], _ = explain_pattern(index, firings[f])
        pattern_s += time.perf_counter() - started
        f1s[f] = held_out_scores(index, rules[f], firings[f])["f1"]
        examples[f] = train_examples(corpus, firings[f], frng)
        samples[f] = held_out_sample(corpus, firings[f], frng, n=args.windows)

    results = []
    for spec in [s.strip() for s in args.explainers.split(",") if s.strip()]:
        started = time.perf_counter()
        if spec == "pattern":
            labels = {f: rules[f].phrase for f in features}
        else:
            same = spec.split(":", 1)[1] in ("default", "smollm2-135m") and args.judge in ("hf:default", "hf:smollm2-135m")
            explainer = LLMExplainer(judge_llm if same else open_llm(spec, llm_model=args.llm_model))
            labels = {f: explainer.explain(examples[f]) for f in features}
        explain_s = (time.perf_counter() - started + (pattern_s if spec == "pattern" else 0.0)) / len(features)
        order = np.random.default_rng(args.seed + 1).permutation(len(features))
        shuffled = {features[i]: labels[features[order[(k + 1) % len(order)]]] for k, i in enumerate(order)}  # no feature keeps its own
        row = {"explainer": spec, "features": len(features), "explain_s_per_feature": explain_s}
        started = time.perf_counter()
        for suffix, given in (("", labels), ("_control", shuffled)):
            for name, scorer in (("detection", DetectionScorer(judge)), ("fuzzing", FuzzingScorer(judge))):
                accuracies, aucs = [], []
                for f in features:
                    accuracies.append(scorer.score(given[f], samples[f]))
                    aucs.append(auc(*scorer.last) if accuracies[-1] is not None else None)
                row[name + suffix], row[f"{name}_auc{suffix}"] = mean(accuracies), mean(aucs)
            if not suffix:
                score_s = (time.perf_counter() - started) / len(features)
        row["score_s_per_feature"] = score_s
        row["pattern_f1"] = mean(f1s[f] for f in features) if spec == "pattern" else None
        row["examples"] = {int(f): labels[f] for f in features[:5]}
        results.append(row)
        print(f"{spec}: done in {explain_s + score_s:.1f} s/feature (plus the control)", flush=True)

    print("balanced accuracy (AUC) of the labels and of the shuffled control; F1: the pattern labels' held-out F1")
    print(f"{'explainer':<16} {'n':>4} {'detection':>13} {'control':>13} {'fuzzing':>13} {'control':>13} {'F1':>6} "
          f"{'s/feat label':>12} {'s/feat score':>12}")
    for r in results:
        cell = {k: f"{fmt(r[k])} ({fmt(r[k.replace('detection', 'detection_auc').replace('fuzzing', 'fuzzing_auc')])})"
                for k in ("detection", "detection_control", "fuzzing", "fuzzing_control")}
        print(f"{r['explainer']:<16} {r['features']:>4} {cell['detection']:>13} {cell['detection_control']:>13} "
              f"{cell['fuzzing']:>13} {cell['fuzzing_control']:>13} {fmt(r['pattern_f1']):>6} "
              f"{r['explain_s_per_feature']:>12.2f} {r['score_s_per_feature']:>12.2f}")
    for r in results:
        for f, label in r["examples"].items():
            print(f"  {r['explainer']} feature {f}: {label}")
    out = {"db": str(args.db), "sae": record.name, "judge": args.judge, "windows": args.windows, "seed": args.seed, "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
