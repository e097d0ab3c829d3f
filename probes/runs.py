"""The jobs behind `workbench sparsity ...`: measure a model, fit laws over a series, summarise.

Every job validates its whole request before it loads a model or opens the workspace for
writing, so bad input leaves the workspace untouched.
"""

from __future__ import annotations

from pathlib import Path

from probes import records
from probes.heldout import heldout_tokens
from probes.laws import LawFit, LawFitError, fit_law, get_law
from probes.sparsity import check_request, measure
from workbench.errors import WorkbenchError
from workbench.workspace import Workspace, ensure_writable


def run_measure(db: Path, model_name: str, *, corpus: str = "stdlib", ps: list[float] | None = None,
                metrics: list[str] | None = None, eval_tokens: int = 16_384, ctx: int = 256,
                calibration_tokens: int = 2048, batch_size: int = 8, device: str | None = None, model_dtype: str | None = None,
                series: str | None = None, train_tokens: int | None = None, model=None, progress: bool = True) -> list[dict]:
    """Measure one model (or a loaded ``model``: a LoadedModel) and record it; returns the stored rows."""
    from workbench.models import load_model

    ps = list(ps or [1.0])
    metrics = list(metrics or ["cett", "zero"])
    check_request(metrics, ps)
    if (series is None) != (train_tokens is None) or (train_tokens is not None and train_tokens <= 0):
        raise WorkbenchError("a series checkpoint needs both --series and --train-tokens > 0 (or neither)")
    if eval_tokens <= 0 or calibration_tokens <= 0 or ctx < 2 or batch_size <= 0:
        raise WorkbenchError(f"need --tokens > 0, --calibration-tokens > 0, --ctx ≥ 2 and --batch > 0 "
                             f"(got {eval_tokens}, {calibration_tokens}, {ctx}, {batch_size})")
    ensure_writable(db)
    loaded = model or load_model(model_name, device=device, dtype=model_dtype)
    shape = records.model_shape(loaded.model)  # refuses models without MLP neurons before any work
    tokens = heldout_tokens(loaded.tokenizer, corpus, eval_tokens, ctx)  # (rows, ctx)
    results = measure(loaded.model, tokens, metrics=metrics, ps=ps, calibration_tokens=calibration_tokens,
                      batch_size=batch_size, progress=progress)
    with Workspace(db) as ws:
        ids = records.save_measurements(ws, results, model=model_name, shape=shape, corpus=corpus,
                                        eval_tokens=int(tokens[:, 1:].numel()), series=series, train_tokens=train_tokens)
        return [r for r in records.measurements(ws, series) if r["measurement_id"] in ids]


def run_fit(ws: Workspace, series: str, law: str, label: str) -> LawFit:
    """Fit one law to a series' (training tokens, activation ratio) points and store it."""
    get_law(law)  # unknown law -> one-line error before anything else
    points = records.series_points(ws, series, label)
    if not points:
        known = sorted({(r["series"], r["label"]) for r in records.measurements(ws) if r["series"]})
        raise LawFitError(f"no measurements for series '{series}' with metric {label}; "
                          f"have: {', '.join(f'{s} [{m}]' for s, m in known) or 'none'}")
    fit = fit_law(law, [t for t, _ in points], [a for _, a in points])
    records.save_fit(ws, series, label, fit)
    return fit


def describe_measurement(row: dict, layers: list[tuple]) -> str:
    ratios = " ".join(f"{r:.2f}" for _, r, _ in layers)
    knob = "" if row["knob"] is None else f" knob {row['knob']:.4f}"
    return (f"{row['model']} {row['label']:<16} activation ratio {row['activation_ratio']:.3f} "
            f"(sparsity {1 - row['activation_ratio']:.3f}); PPL {row['ppl']:.3f} vs dense {row['ppl_dense']:.3f}{knob}\n"
            f"  per layer: {ratios}")


def describe_fit(series: str, label: str, fit) -> str:
    params = ", ".join(f"{k} = {v:.4g} ± {fit.stderr[k]:.2g}" for k, v in fit.params.items())
    return f"{series} [{label}] {fit.law} law: {params}; R² = {fit.r2:.3f} over {fit.n_points} checkpoints"


def summary(ws: Workspace) -> str:
    lines = []
    for row in records.measurements(ws):
        where = f"{row['series']} @ {row['train_tokens']:,} tokens: " if row["series"] else ""
        lines.append(where + describe_measurement(row, records.layer_ratios(ws, row["measurement_id"])))
    lines += [describe_fit(series, label, fit) for series, label, fit in records.fits(ws)]
    return "\n".join(lines) or "no sparsity measurements yet (run `workbench sparsity measure`)"

