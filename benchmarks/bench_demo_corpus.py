"""Which built-in corpus makes the demo's features clearer, and what each demo stage costs.

    .venv/bin/python benchmarks/bench_demo_corpus.py [--out workspaces/corpus-bench] [--corpora stdlib,stdlib:balanced]

Builds the demo workspace once per corpus (``workbench demo``'s own stages: cache 65,536 tokens,
train the TopK SAE, analyze, label every feature with the pattern explainer; a rerun reuses
finished stages) and reports, side by side:

- seconds per stage (the explain stage is what labelling adds to ``workbench demo``);
- the SAE's fraction of variance unexplained and its dead fraction;
- the **labelled fraction**: live features whose pattern label reaches held-out F1 ≥ 0.5, i.e.
  its rule finds at least as many of the feature's held-out firings as it misses, with precision
  to match; and the mean held-out F1 over live features;
- how live features split by their dominant domain, and the labelled fraction within each
  (``(separator)``: features that fire mostly on the end-of-text token between documents).

Held-out F1 is measured on each workspace's own held-out contexts, so it compares how well a
token-level rule describes the features each corpus produces, not one fixed test set.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.5


def corpus_stats(db: Path) -> dict:
    """The labelled fraction and its split by dominant domain for the demo SAE of ``db``."""
    from workbench.demo import DEMO_SAE
    from workbench.explanations import PATTERN
    from workbench.workspace import Workspace, resolve_sae

    with Workspace(db, read_only=True) as ws:
        record = resolve_sae(ws, DEMO_SAE["name"])
        rows = ws.query(
            """SELECT e.feature, e.detail, e.scores FROM feature_explanations e
               JOIN feature_stats s ON s.sae_id = e.sae_id AND s.feature = e.feature
               WHERE e.sae_id = ? AND e.explainer = ? AND s.n_fired > 0 ORDER BY e.feature""",
            [record.sae_id, PATTERN],
        )
        metrics = json.loads(ws.query("SELECT metrics FROM saes WHERE sae_id = ?", [record.sae_id])[0][0] or "{}")
        tokens = dict(ws.query(
            """SELECT d.domain, count(*) FROM tokens t JOIN contexts c USING (context_id) JOIN runs r USING (run_id)
               JOIN documents d ON d.corpus_id = r.corpus_id AND d.doc_id = t.doc_id
               WHERE c.run_id = ? GROUP BY d.domain ORDER BY d.domain""", [record.run_id]))
    f1 = {f: json.loads(scores).get("f1") for f, _, scores in rows}
    domain = {f: (json.loads(detail).get("domains") or [["", 1.0]])[0][0] or "(separator)" for f, detail, _ in rows}
    scored = [v for v in f1.values() if v is not None]
    by_domain = Counter(domain.values())
    labelled = Counter(domain[f] for f, v in f1.items() if v is not None and v >= THRESHOLD)
    return {
        "width": record.width, "live": len(rows), "fvu": metrics.get("fvu"), "dead_fraction": metrics.get("dead_fraction"),
        "labelled_fraction": sum(labelled.values()) / max(len(rows), 1),
        "mean_f1": sum(scored) / max(len(scored), 1),
        "tokens_by_domain": tokens,
        "domains": {d: {"live": n, "labelled_fraction": labelled[d] / n} for d, n in sorted(by_domain.items())},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "workspaces" / "corpus-bench")
    parser.add_argument("--corpora", default="stdlib,stdlib:balanced")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from workbench.cli import quiet_third_party
    from workbench.demo import build_demo

    quiet_third_party()
    results = {}
    for corpus in [c.strip() for c in args.corpora.split(",") if c.strip()]:
        db = args.out / (re.sub(r"[^A-Za-z0-9]+", "-", corpus) + ".duckdb")
        print(f"{corpus}: building {db} (stages already done are reused)", flush=True)
        seconds = build_demo(db, corpus=corpus)
        results[corpus] = {"db": str(db), "seconds": seconds, **corpus_stats(db)}

    print(f"\nlabelled: a live feature whose pattern label reaches held-out F1 ≥ {THRESHOLD}")
    print(f"{'corpus':<18} {'live':>6} {'FVU':>6} {'labelled':>9} {'mean F1':>8}   seconds: cache / train / analyze / explain")
    for corpus, r in results.items():
        s = r["seconds"]
        print(f"{corpus:<18} {r['live']:>6} {r['fvu']:>6.3f} {r['labelled_fraction']:>9.3f} {r['mean_f1']:>8.3f}   "
              f"{s['cache']:.0f} / {s['train']:.0f} / {s['analyze']:.0f} / {s['explain']:.0f}")
    for corpus, r in results.items():
        total = sum(r["tokens_by_domain"].values())
        print(f"\n{corpus}: cached tokens by domain: "
              + ", ".join(f"{d} {n / total:.0%}" for d, n in r["tokens_by_domain"].items()))
        for d, v in r["domains"].items():
            print(f"  {d:<10} {v['live']:>5} live features, labelled fraction {v['labelled_fraction']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
