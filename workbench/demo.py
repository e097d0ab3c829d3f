"""The default workspace: what `workbench demo` builds, one resumable stage at a time.

Stages, each skipped when the workspace already holds its result:
cache (65,536 tokens of the built-in corpus at one residual hook) → train (a TopK SAE) →
analyze (feature pages) → explain (a pattern label for every feature, no language model).
``build_demo`` returns the seconds each stage took, so the choice of corpus and the demo's time
budget are measured by the same code that users run (``benchmarks/bench_demo_corpus.py``).
"""

from __future__ import annotations

import time
from pathlib import Path

DEMO = dict(model="smollm2-135m", hook="blocks.15.hook_resid_post", corpus="stdlib", tokens=65_536, ctx=128)
DEMO_SAE = dict(name="demo-topk", arch="topk", width=2304, k=32, train_tokens=524_288, batch_size=4096)
STAGES = ("cache", "train", "analyze", "explain")


def demo_cached(db: Path) -> bool:
    """Whether the workspace already holds the demo's finished cache run (skips loading model and corpus)."""
    from workbench.workspace import Workspace

    if not db.exists():
        return False
    with Workspace(db) as ws:  # opened for writing: migrates an older schema
        return bool(ws.query(
            """SELECT count(*) FROM runs r JOIN run_hooks h USING (run_id)
               WHERE r.kind = 'cache' AND r.status = 'done' AND r.model = ? AND h.hook = ? AND r.ctx_len = ?
                 AND r.n_contexts_target * r.ctx_len >= ?""",
            [DEMO["model"], DEMO["hook"], DEMO["ctx"], DEMO["tokens"]],
        )[0][0])


def build_demo(db: Path, *, corpus: str = DEMO["corpus"], device: str | None = None, model_dtype: str | None = None) -> dict[str, float]:
    """Build (or finish) the demo workspace at ``db`` on ``device`` (None: CUDA when there is one); seconds per
    stage, 0 for a stage already done.

    ``corpus`` only matters when the cache stage runs: a workspace that already holds the demo's
    cache run keeps it, whatever corpus that run read.
    """
    import saes
    from workbench.explanations import PATTERN, explain
    from workbench.models import load_model
    from workbench.training import train_sae
    from workbench.workspace import Workspace, resolve_sae

    seconds = dict.fromkeys(STAGES, 0.0)
    db.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not demo_cached(db):
        from workbench.caching import run_cache

        run_cache(db=db, model=DEMO["model"], hooks=[DEMO["hook"]], corpus=corpus, tokens=DEMO["tokens"],
                  ctx=DEMO["ctx"], device=device, model_dtype=model_dtype)
        seconds["cache"] = time.perf_counter() - started
    model = None

    def loaded(ws):
        nonlocal model
        if model is None:
            model = load_model(ws.run_model(ws.resolve_hook_run(DEMO["hook"], None)), device=device, dtype=model_dtype)
        return model

    with Workspace(db) as ws:
        started = time.perf_counter()
        if not ws.query("SELECT count(*) FROM saes WHERE name = ? AND status = 'done'", [DEMO_SAE["name"]])[0][0]:
            train_cfg = saes.TrainConfig(total_tokens=DEMO_SAE["train_tokens"], batch_size=DEMO_SAE["batch_size"], bf16_autocast=True,
                                         checkpoint_every=20)
            fields = dict(arch=DEMO_SAE["arch"], width=DEMO_SAE["width"], k=DEMO_SAE["k"])
            train_sae(ws, DEMO["hook"], fields, train_cfg, name=DEMO_SAE["name"], model=loaded(ws), device=device)
            seconds["train"] = time.perf_counter() - started
        started = time.perf_counter()
        if not ws.query("SELECT count(*) FROM analyses a JOIN saes s USING (sae_id) WHERE s.name = ? AND a.status = 'done'",
                        [DEMO_SAE["name"]])[0][0]:
            from workbench.analysis import analyze

            analyze(ws, DEMO_SAE["name"], model=loaded(ws), device=device)
            seconds["analyze"] = time.perf_counter() - started
        started = time.perf_counter()
        record = resolve_sae(ws, DEMO_SAE["name"])
        summary = explain(ws, record, list(range(record.width)), explainer=PATTERN)  # resumable: only unlabelled features
        if summary.explained:
            seconds["explain"] = time.perf_counter() - started
    return seconds
