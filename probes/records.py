"""Sparsity measurements and law fits in the workspace (tables from schema v4).

One measurement = one model (or series checkpoint) × one metric × one PPL-p%; it is written
with its per-layer ratios and its trade-off curve in a single transaction, so an interrupted
series leaves whole measurements only and a rerun skips what is already there.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from probes.laws import LawFit
from probes.neurons import activation_function, mlp_sites
from probes.sparsity import Measurement
from workbench.workspace import Workspace


class ModelShape(NamedTuple):
    activation: str
    d_model: int
    n_layers: int
    d_mlp: int


def model_shape(model) -> ModelShape:
    sites = mlp_sites(model)
    return ModelShape(activation_function(model), int(sites[0].w_out.shape[0]), len(sites), int(sites[0].w_out.shape[1]))


def metric_label(metric: str, p: float | None) -> str:
    """'cett@PPL-1%' for searched metrics, 'zero' for the exact-zero count."""
    return metric if p is None else f"{metric}@PPL-{p:g}%"


def _p_clause(p: float | None) -> tuple[str, list]:
    return ("p IS NULL", []) if p is None else ("p = ?", [float(p)])


def is_measured(ws: Workspace, model: str, metric: str, p: float | None, series: str | None = None,
                train_tokens: int | None = None) -> bool:
    clause, params = _p_clause(p)
    train_tokens = None if train_tokens is None else int(train_tokens)
    rows = ws.query(
        f"SELECT count(*) FROM sparsity_measurements WHERE model = ? AND metric = ? AND {clause} "
        "AND series IS NOT DISTINCT FROM ? AND train_tokens IS NOT DISTINCT FROM ?",
        [model, metric, *params, series, train_tokens],
    )
    return rows[0][0] > 0


def save_measurements(ws: Workspace, measurements: list[Measurement], *, model: str, shape: ModelShape, corpus: str,
                      eval_tokens: int, series: str | None = None, train_tokens: int | None = None) -> list[int]:
    """Replace any earlier rows for the same (model, series, checkpoint, metric, p); returns the new ids."""
    ids = []
    train_tokens = None if train_tokens is None else int(train_tokens)
    with ws.transaction() as con:
        for m in measurements:
            clause, params = _p_clause(m.p)
            old = [r[0] for r in con.execute(
                f"SELECT measurement_id FROM sparsity_measurements WHERE model = ? AND metric = ? AND {clause} "
                "AND series IS NOT DISTINCT FROM ? AND train_tokens IS NOT DISTINCT FROM ?",
                [model, m.metric, *params, series, train_tokens]).fetchall()]
            for table in ("sparsity_layers", "sparsity_curve", "sparsity_measurements"):
                for stale in old:
                    con.execute(f"DELETE FROM {table} WHERE measurement_id = ?", [stale])
            (mid,) = con.execute(
                "INSERT INTO sparsity_measurements (model, series, train_tokens, activation, d_model, n_layers, d_mlp, "
                "metric, p, knob, ppl_dense, ppl, activation_ratio, eval_tokens, corpus) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING measurement_id",
                [model, series, train_tokens, *shape, m.metric, m.p, m.knob, m.ppl_dense, m.ppl, m.activation_ratio,
                 eval_tokens, corpus],
            ).fetchone()
            thresholds = m.thresholds or [None] * len(m.layer_ratios)
            con.executemany("INSERT INTO sparsity_layers VALUES (?, ?, ?, ?)",
                            [[mid, layer, r, t] for layer, (r, t) in enumerate(zip(m.layer_ratios, thresholds))])
            if m.curve:
                con.executemany("INSERT INTO sparsity_curve VALUES (?, ?, ?, ?)", [[mid, *map(float, point)] for point in m.curve])
            ids.append(mid)
    return ids


MEASUREMENT_COLUMNS = ("measurement_id", "model", "series", "train_tokens", "activation", "d_model", "n_layers", "d_mlp",
                       "metric", "p", "knob", "ppl_dense", "ppl", "activation_ratio", "eval_tokens", "corpus")


def measurements(ws: Workspace, series: str | None = None) -> list[dict]:
    """All measurements (or one series'), each a dict with MEASUREMENT_COLUMNS and a 'label'."""
    where, params = ("WHERE series = ?", [series]) if series is not None else ("", [])
    rows = ws.query(f"SELECT {', '.join(MEASUREMENT_COLUMNS)} FROM sparsity_measurements {where} "
                    "ORDER BY series NULLS FIRST, train_tokens, model, metric, p, measurement_id", params)
    out = [dict(zip(MEASUREMENT_COLUMNS, row)) for row in rows]
    for row in out:
        row["label"] = metric_label(row["metric"], row["p"])
    return out


def layer_ratios(ws: Workspace, measurement_id: int) -> list[tuple[int, float, float | None]]:
    """(layer, activation ratio, threshold) rows."""
    return ws.query("SELECT layer, activation_ratio, threshold FROM sparsity_layers WHERE measurement_id = ? ORDER BY layer",
                    [measurement_id])


def tradeoff_curve(ws: Workspace, measurement_id: int) -> list[tuple[float, float, float]]:
    """(knob, ppl, activation ratio) points evaluated by the PPL-p% search, knob ascending."""
    return ws.query("SELECT knob, ppl, activation_ratio FROM sparsity_curve WHERE measurement_id = ? ORDER BY ALL",
                    [measurement_id])


def series_points(ws: Workspace, series: str, label: str) -> list[tuple[int, float]]:
    """(training tokens, activation ratio) over a series' checkpoints for one metric label."""
    return [(r["train_tokens"], r["activation_ratio"]) for r in measurements(ws, series) if r["label"] == label]


def save_fit(ws: Workspace, series: str, metric_label_: str, fit: LawFit) -> None:
    with ws.transaction() as con:
        con.execute("DELETE FROM sparsity_fits WHERE series = ? AND law = ? AND metric = ?", [series, fit.law, metric_label_])
        con.execute("INSERT INTO sparsity_fits (series, law, metric, fit) VALUES (?, ?, ?, ?)",
                    [series, fit.law, metric_label_, json.dumps(fit.to_dict())])


def fits(ws: Workspace) -> list[tuple[str, str, LawFit]]:
    """(series, metric label, fit) for every stored fit."""
    rows = ws.query("SELECT series, metric, fit FROM sparsity_fits ORDER BY series, law, metric")
    return [(series, metric, LawFit.from_dict(json.loads(fit))) for series, metric, fit in rows]

