"""The job behind `workbench moe run`: validate the request, resolve it against the workspace
(its SAE, and the model and corpus it was cached with), load the model, measure, and store the
results in one transaction at the end, so bad input or an interruption leaves no rows.

One job per module:

    probes.moe_request   MoeRequest (validated on construction) and plan_run (resolved against the model)
    probes.moe_groups    TokenGroups: domains, token concepts, where a loss is credited
    probes.moe_capture   activation capture and interventions on a forward
    probes.moe_kinds     one adapter per unit kind (moe, moefied, neuron, sae) and per expert source
    probes.moe_measure   measure: steps 1-5 on a loaded model (the algorithm is described there)
    probes.moe_masking   steps 4-5: masking selectivity and concept purge
    probes.moe_results   MoeResult and its parts
    probes.moe_report    describe: a stored run as text
    probes.moe_records   the workspace tables
"""

from __future__ import annotations

import time
from pathlib import Path

from probes import domains as dom
from probes.moe_measure import measure
from probes.moe_request import DEFAULT_MODEL, MoeRequest, MoeRunError, plan_run
from probes.moe_results import MoeResult


def _reader(db: Path):
    """The workspace for reading (an older schema is migrated by opening it for writing); None if absent."""
    from workbench.workspace import Workspace, WorkspaceBusy, WorkspaceError

    if not db.exists():
        return None
    try:
        return Workspace(db, read_only=True)
    except WorkspaceBusy:
        raise
    except WorkspaceError:
        return Workspace(db)  # migrates an older schema (no rows written), or raises its own error


def workspace_defaults(ws, sae_ref: str | None):
    """(SAE record or None, the model and corpus the workspace was cached with, or None)."""
    from workbench.workspace import fetch_one, resolve_sae

    if ws is None:
        if sae_ref is not None:
            raise MoeRunError(f"--sae {sae_ref} needs an existing workspace with that SAE")
        return None, None, None
    record = resolve_sae(ws, sae_ref) if sae_ref is not None else None
    where = ("WHERE r.run_id = ?", [record.run_id]) if record is not None else ("WHERE r.kind = 'cache'", [])
    row = fetch_one(ws.con, f"SELECT r.model, c.spec FROM runs r JOIN corpora c USING (corpus_id) {where[0]} "
                            "ORDER BY r.run_id LIMIT 1", where[1])
    if row is None:
        return record, None, None
    return record, row[0], row[1].split("#")[0]


def run_moe(db: Path, request: MoeRequest, *, loaded=None, model_dtype: str | None = None,
            progress: bool = True) -> tuple[int, MoeResult]:
    """Validate, measure and store one run; returns (moe_run_id, result). ``model_dtype``: the
    precision the model loads in when ``loaded`` is None (``workbench.devices.model_dtype``)."""
    from probes import moe_records
    from workbench.models import load_model
    from workbench.workspace import Workspace, ensure_writable

    started = time.time()
    db = Path(db)
    if not db.expanduser().resolve().parent.is_dir():
        raise MoeRunError(f"workspace directory does not exist: {db.parent} (create it first or choose another --db)")
    ensure_writable(db)
    ws = _reader(db)
    try:
        record, ws_model, ws_corpus = workspace_defaults(ws, request.sae)
    finally:
        if ws is not None:
            ws.close()
    model_name = request.model or (loaded.name if loaded is not None else None) or ws_model or DEFAULT_MODEL
    if record is not None and ws_model is not None and model_name != ws_model:
        raise MoeRunError(f"SAE '{record.name}' was trained on {ws_model}'s activations; use --model {ws_model}")
    corpus = request.corpus or ws_corpus or "stdlib"
    loaded = loaded or load_model(model_name, device=request.device, dtype=model_dtype)
    plan = plan_run(loaded.model, request, record)
    tokens = dom.domain_tokens(loaded.tokenizer, corpus, eval_tokens=request.eval_tokens, fit_tokens=request.fit_tokens,
                               ctx=request.ctx, seed=request.seed)
    result = measure(loaded, plan, tokens, request, corpus=corpus, progress=progress)
    result.model = model_name
    result.seconds = time.time() - started
    with Workspace(db) as ws:
        run_id = moe_records.save_run(ws, result, request)
    return run_id, result
