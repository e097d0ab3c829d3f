"""Expert-probe runs and sparse-probing results in the workspace (tables from schema v5).

One `workbench moe run` is one ``moe_runs`` row plus its per-group, per-expert, comparison,
selectivity (per grouping and budget), k-curve, concept-correlation, purge and per-token routing
rows, all written in one transaction. A rerun with
the same configuration replaces the earlier run. One `workbench probe` is one ``probe_runs``
row with its ``probe_results``; a rerun for the same SAE, dataset, ks and seed replaces it.

``moe_routes`` keeps, per evaluated token and layer, the selected experts (best first) and their
``weights``: the routing weights for a MoE model, the expert scores ‖a_{N_e}‖ for a MoEfied one.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from workbench.storage import insert_arrow
from workbench.workspace import Workspace

MOE_TABLES = ("moe_routes", "moe_k_curve", "moe_selectivity", "moe_comparison", "moe_experts", "moe_mass", "moe_groups",
              "moe_correlation", "moe_purge")
RUN_COLUMNS = ("moe_run_id", "model", "architecture", "source", "layers", "n_experts", "k", "sae", "corpus", "domains",
               "eval_tokens", "balance", "config", "notices", "seconds", "created_at")


def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def save_run(ws: Workspace, result, request) -> int:
    """Store a ``probes.moe_results.MoeResult``; an earlier run with the same config is replaced."""
    plan, tokens = result.plan, result.tokens
    config = json.dumps(result.config(request), sort_keys=True)
    eval_tokens = int((tokens.eval_labels >= 0).sum())
    with ws.transaction() as con:
        old = [r[0] for r in con.execute("SELECT moe_run_id FROM moe_runs WHERE config = ?::JSON", [config]).fetchall()]
        for stale in old:
            for table in (*MOE_TABLES, "moe_runs"):
                con.execute(f"DELETE FROM {table} WHERE moe_run_id = ?", [stale])
        (run_id,) = con.execute(
            "INSERT INTO moe_runs (model, architecture, source, layers, n_experts, k, sae, corpus, domains, eval_tokens, "
            "balance, config, notices, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING moe_run_id",
            [result.model, plan.architecture, plan.source, plan.layers, plan.n_experts, plan.k,
             plan.sae.name if plan.sae is not None else None, result.corpus, list(tokens.names), eval_tokens,
             tokens.balance, config, result.notices, result.seconds],
        ).fetchone()
        groups, mass, experts = [], {k: [] for k in ("layer", "kind", "grouping", "grp", "expert", "mass", "freq")}, []
        for grouping, s in result.summaries:
            for row in s.summary_rows():
                groups.append([run_id, row["layer"], row["kind"], grouping, row["group"], row["tokens"],
                               row["specialised_share"], row["n_specialised"], _nan_to_none(row["entropy"])])
            n_groups, n_experts = s.mass.shape
            mass["layer"] += [s.layer] * (n_groups * n_experts)
            mass["kind"] += [s.kind] * (n_groups * n_experts)
            mass["grouping"] += [grouping] * (n_groups * n_experts)
            mass["grp"] += [name for name in s.names for _ in range(n_experts)]
            mass["expert"] += list(range(n_experts)) * n_groups
            mass["mass"] += s.mass.ravel().tolist()
            mass["freq"] += s.freq.ravel().tolist()
            for row in s.expert_rows():
                experts.append([run_id, row["layer"], row["kind"], grouping, row["expert"], _nan_to_none(row["purity"]),
                                row["specialist"], row["freq"]])
        n = len(mass["expert"])
        insert_arrow(con, "moe_mass", {"moe_run_id": pa.array([run_id] * n, pa.int32()),
                                  "layer": pa.array(mass["layer"], pa.int32()), "kind": mass["kind"],
                                  "grouping": mass["grouping"], "grp": mass["grp"],
                                  "expert": pa.array(mass["expert"], pa.int32()), "mass": mass["mass"], "freq": mass["freq"]})
        insert_arrow(con, "moe_groups", {name: [r[i] for r in groups] for i, name in enumerate(
            ("moe_run_id", "layer", "kind", "grouping", "grp", "tokens", "specialised_share", "n_specialised", "entropy"))})
        insert_arrow(con, "moe_experts", {name: [r[i] for r in experts] for i, name in enumerate(
            ("moe_run_id", "layer", "kind", "grouping", "expert", "purity", "specialist", "freq"))})
        for row in result.comparison():
            con.execute("INSERT INTO moe_comparison VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [run_id, row["layer"], row["kind"], row["grouping"], row["experts"], row["dead"],
                         row["specialised_share"], _nan_to_none(row["mean_entropy"]), _nan_to_none(row["mean_purity"]),
                         row["mi_nats"], row["mi_norm"]])
        for m in result.masking:
            sel = dict(zip(m.matrix.targets, m.matrix.selectivity.tolist()))
            rows = m.matrix.rows()
            if rows:
                con.executemany(
                    "INSERT INTO moe_selectivity (moe_run_id, kind, grouping, budget, target, measured, target_pos, "
                    "measured_pos, n_masked, loss_before, loss_after, delta_loss, selectivity) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[run_id, m.kind, m.grouping, m.budget, row["target"], row["measured"],
                      m.matrix.targets.index(row["target"]), m.matrix.measured.index(row["measured"]),
                      m.n_masked[row["target"]], m.before[row["measured"]], m.after[row["target"]][row["measured"]],
                      row["delta_loss"], _nan_to_none(sel[row["target"]])] for row in rows])
        corr = {k: [] for k in ("kind", "layer", "concept", "expert", "rho")}
        for kind, layer, concept, rho in result.correlations:
            corr["kind"] += [kind] * len(rho)
            corr["layer"] += [layer] * len(rho)
            corr["concept"] += [concept] * len(rho)
            corr["expert"] += list(range(len(rho)))
            corr["rho"] += [None if math.isnan(r) else float(r) for r in rho]
        insert_arrow(con, "moe_correlation", {"moe_run_id": pa.array([run_id] * len(corr["expert"]), pa.int32()),
                                         "kind": corr["kind"], "layer": pa.array(corr["layer"], pa.int32()),
                                         "concept": corr["concept"], "expert": pa.array(corr["expert"], pa.int32()),
                                         "rho": pa.array(corr["rho"], pa.float64())})
        purge_rows = [[run_id, p.kind, p.concept, pt.tau, pt.n_removed, pt.share_removed, pt.concept_loss, pt.other_loss,
                       p.concept_before, p.other_before] for p in result.purges for pt in p.points]
        if purge_rows:
            con.executemany("INSERT INTO moe_purge VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", purge_rows)
        dense = result.dense
        if result.curve:
            con.executemany("INSERT INTO moe_k_curve VALUES (?, ?, ?, ?, ?)",
                            [[run_id, k, grp, loss, dense[grp]] for k, grp, loss in result.curve])
        ctx = tokens.eval_tokens.shape[1]
        flat_ids = tokens.eval_tokens.reshape(-1).numpy()
        flat_labels = tokens.eval_labels.reshape(-1).numpy()
        names = np.asarray(tokens.names, dtype=object)
        for layer, indices, weights in result.routes:
            n = indices.shape[0]
            idx = np.arange(n)
            insert_arrow(con, "moe_routes", {
                "moe_run_id": pa.array([run_id] * n, pa.int32()), "layer": pa.array([layer] * n, pa.int32()),
                "row": pa.array(idx // ctx, pa.int32()), "position": pa.array(idx % ctx, pa.int16()),
                "token_id": pa.array(flat_ids[:n], pa.int32()),
                "grp": [names[lab] if lab >= 0 else None for lab in flat_labels[:n]],
                "experts": pa.array(indices.tolist(), pa.list_(pa.int32())),
                "weights": pa.array(weights.float().tolist(), pa.list_(pa.float32())),
            })
    return int(run_id)


# -- reading ---------------------------------------------------------------------------------
def _dicts(ws: Workspace, sql: str, params: list | None = None) -> list[dict]:
    cursor = ws.con.execute(sql, params or [])
    columns = [c[0] for c in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


def has_tables(ws: Workspace) -> bool:
    return ws.schema_version() >= 6


def runs(ws: Workspace) -> list[dict]:
    """Every stored MoE run, newest last; config parsed."""
    out = _dicts(ws, f"SELECT {', '.join(RUN_COLUMNS)} FROM moe_runs ORDER BY moe_run_id")
    for row in out:
        row["config"] = json.loads(row["config"])
    return out


def comparison(ws: Workspace, run_id: int) -> list[dict]:
    order = "CASE kind WHEN 'moe' THEN 0 WHEN 'moefied' THEN 1 WHEN 'sae' THEN 2 ELSE 3 END"
    return _dicts(ws, f"SELECT * EXCLUDE (moe_run_id) FROM moe_comparison WHERE moe_run_id = ? ORDER BY grouping, {order}, kind, layer",
                  [run_id])


def groups(ws: Workspace, run_id: int) -> list[dict]:
    return _dicts(ws, "SELECT * EXCLUDE (moe_run_id) FROM moe_groups WHERE moe_run_id = ? ORDER BY kind, layer, grouping, grp",
                  [run_id])


def selectivity(ws: Workspace, run_id: int) -> list[dict]:
    """ΔLoss rows (kind, grouping, budget, target, measured, n_masked, losses, selectivity), in stored group order."""
    return _dicts(ws, "SELECT * EXCLUDE (moe_run_id, target_pos, measured_pos) FROM moe_selectivity WHERE moe_run_id = ? "
                      "ORDER BY kind, CASE grouping WHEN 'domain' THEN 0 ELSE 1 END, CASE budget WHEN 'skew' THEN 0 ELSE 1 END, "
                      "target_pos, target, measured_pos, measured", [run_id])


def purge(ws: Workspace, run_id: int) -> list[dict]:
    """Concept purge points (kind, concept, tau, n_removed, share_removed, losses and their baselines), τ descending."""
    return _dicts(ws, "SELECT * EXCLUDE (moe_run_id) FROM moe_purge WHERE moe_run_id = ? ORDER BY kind, concept, tau DESC, n_removed",
                  [run_id])


def correlation(ws: Workspace, run_id: int, kind: str, concept: str, limit: int = 20) -> list[dict]:
    """The units of one kind most correlated with a concept (layer, expert, rho), ρ descending."""
    return _dicts(ws, "SELECT layer, expert, rho FROM moe_correlation WHERE moe_run_id = ? AND kind = ? AND concept = ? "
                      "AND rho IS NOT NULL ORDER BY rho DESC, layer, expert LIMIT ?", [run_id, kind, concept, limit])


def k_curve(ws: Workspace, run_id: int) -> list[dict]:
    return _dicts(ws, "SELECT k, grp, loss, dense_loss FROM moe_k_curve WHERE moe_run_id = ? ORDER BY grp, k", [run_id])


def mass(ws: Workspace, run_id: int, layer: int, kind: str, grouping: str) -> list[dict]:
    """r_{e,d} rows (grp, expert, mass, freq) of one kind at one layer."""
    return _dicts(ws, "SELECT grp, expert, mass, freq FROM moe_mass WHERE moe_run_id = ? AND layer = ? AND kind = ? "
                      "AND grouping = ? ORDER BY expert, grp", [run_id, layer, kind, grouping])


def experts(ws: Workspace, run_id: int, layer: int, kind: str, grouping: str) -> list[dict]:
    return _dicts(ws, "SELECT expert, purity, specialist, freq FROM moe_experts WHERE moe_run_id = ? AND layer = ? "
                      "AND kind = ? AND grouping = ? ORDER BY expert", [run_id, layer, kind, grouping])


def routes(ws: Workspace, run_id: int, layer: int, limit: int = 1000) -> list[dict]:
    return _dicts(ws, "SELECT row, position, token_id, grp, experts, weights FROM moe_routes WHERE moe_run_id = ? "
                      "AND layer = ? ORDER BY row, position LIMIT ?", [run_id, layer, limit])


# -- sparse probing --------------------------------------------------------------------------
def save_probing(ws: Workspace, result, dataset: str = "domains") -> int:
    """Store a ``probes.probing.ProbingResult`` (``dataset``: "domains" for the workspace corpus, else the
    labelled texts it came from); an earlier run for the same SAE, dataset, ks and seed is replaced."""
    ks = [int(k) for k in result.ks]
    with ws.transaction() as con:
        old = [r[0] for r in con.execute("SELECT probe_run_id FROM probe_runs WHERE sae = ? AND dataset = ? AND ks = ? "
                                         "AND seed = ?", [result.sae, dataset, ks, result.seed]).fetchall()]
        for stale in old:
            con.execute("DELETE FROM probe_results WHERE probe_run_id = ?", [stale])
            con.execute("DELETE FROM probe_runs WHERE probe_run_id = ?", [stale])
        (run_id,) = con.execute("INSERT INTO probe_runs (sae, hook, dataset, ks, seed, skipped) VALUES (?, ?, ?, ?, ?, ?) "
                                "RETURNING probe_run_id",
                                [result.sae, result.hook, dataset, ks, result.seed, list(result.skipped)]).fetchone()
        rows = result.to_rows()
        if rows:
            con.executemany("INSERT INTO probe_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [[run_id, r["task"], r["source"], r["k"], r["accuracy"], r["n_train"], r["n_test"], r["split"],
                              r["features"]] for r in rows])
    return int(run_id)


def probe_runs(ws: Workspace) -> list[dict]:
    return _dicts(ws, "SELECT * FROM probe_runs ORDER BY probe_run_id")


def probe_results(ws: Workspace, probe_run_id: int | None = None) -> list[dict]:
    """Result rows (with the run's SAE and hook), all runs or one."""
    where, params = ("WHERE r.probe_run_id = ?", [probe_run_id]) if probe_run_id is not None else ("", [])
    return _dicts(ws, f"SELECT p.sae, p.hook, p.dataset, p.seed, r.* FROM probe_results r JOIN probe_runs p USING (probe_run_id) {where} "
                      "ORDER BY r.probe_run_id, r.task, CASE r.source WHEN 'sae' THEN 0 WHEN 'residual' THEN 1 ELSE 2 END, r.source, r.k, "
                      "r.split, r.accuracy, r.n_train, r.n_test, r.features",
                  params)
