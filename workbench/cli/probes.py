"""`workbench moe ...` and `workbench probe`: the expert and probing subcommands.

``configure_moe`` and ``configure_probe`` add their flags (``moe run``'s from ``MoeRequest``).
Every handler checks its arguments before it loads a model or writes, so bad input ends as one
``workbench: error: ...`` line with exit status 2 and no rows in the workspace.
"""

from __future__ import annotations

import argparse

from workbench.cli.options import CliError, Formatter, add_db, add_device, add_fields, add_quiet, config_from, integer

EXAMPLES = {
    "run": "workbench moe run --db workspaces/default.duckdb --sae demo-topk",
    "show": "workbench moe show --db workspaces/default.duckdb",
    "probe": "workbench probe --db workspaces/default.duckdb --sae demo-topk --texts reviews.jsonl --label-field sentiment",
}


# -- handlers ----------------------------------------------------------------------------------
def cmd_moe_run(args: argparse.Namespace) -> None:
    from probes import moe_records
    from probes.moe_report import describe
    from probes.moe_request import MoeRequest
    from probes.moe_runs import run_moe
    from workbench.workspace import Workspace

    request = config_from(args, MoeRequest)
    run_id, result = run_moe(args.db, request, model_dtype=args.model_dtype, progress=not args.quiet)
    with Workspace(args.db, read_only=True) as ws:
        run = next(r for r in moe_records.runs(ws) if r["moe_run_id"] == run_id)
        print(describe(run, moe_records.comparison(ws, run_id), moe_records.k_curve(ws, run_id),
                       moe_records.selectivity(ws, run_id), moe_records.purge(ws, run_id)))
    print(f"stored as moe run {run_id} in {args.db} ({result.seconds:.0f} s)")


def show_text(ws, run_id: int | None = None) -> str:
    from probes import moe_records
    from probes.moe_report import describe
    from probes.probe_table import format_table
    from probes.probing import ProbeRow, ProbingResult

    if not moe_records.has_tables(ws):
        return "no MoE or probing results yet (run `workbench moe run` or `workbench probe`)"
    parts = []
    for run in moe_records.runs(ws):
        if run_id is None or run["moe_run_id"] == run_id:
            rid = run["moe_run_id"]
            parts.append(describe(run, moe_records.comparison(ws, rid), moe_records.k_curve(ws, rid),
                                  moe_records.selectivity(ws, rid), moe_records.purge(ws, rid)))
    if run_id is not None and not parts:
        known = ", ".join(str(r["moe_run_id"]) for r in moe_records.runs(ws)) or "none"
        raise CliError(f"no moe run {run_id} in {ws.path.name}; stored runs: {known}")
    if run_id is None:
        for probe in moe_records.probe_runs(ws):
            rows = moe_records.probe_results(ws, probe["probe_run_id"])
            result = ProbingResult(sae=probe["sae"], hook=probe["hook"], ks=tuple(probe["ks"]), seed=probe["seed"],
                                   rows=[ProbeRow(task=r["task"], source=r["source"], k=r["k"], accuracy=r["accuracy"],
                                                  n_train=r["n_train"], n_test=r["n_test"], split=r["split"],
                                                  features=tuple(r["features"])) for r in rows],
                                   skipped=list(probe["skipped"]))
            head = f"probe run {probe['probe_run_id']} on {probe['dataset']}:"
            parts.append(f"{head}\n{format_table(result)}" if rows else f"{head} no rows")
    return "\n\n".join(parts) or "no MoE or probing results yet (run `workbench moe run` or `workbench probe`)"


def cmd_moe_show(args: argparse.Namespace) -> None:
    from workbench.workspace import Workspace

    with Workspace(args.db, read_only=True) as ws:
        print(show_text(ws, args.run))


def cmd_probe(args: argparse.Namespace) -> None:
    from probes import moe_records
    from probes.probe_fit import DEFAULT_KS
    from probes.probe_table import format_table
    from probes.probing import probe_texts, sparse_probing
    from workbench.data.labelled import load_labelled
    from workbench.workspace import Workspace, ensure_writable, resolve_sae

    Workspace(args.db, read_only=True).close()  # exists, readable, not busy: before the texts load
    texts = load_labelled(args.texts, text_field=args.text_field, label_field=args.label_field) if args.texts else None
    ensure_writable(args.db)
    ks = tuple(args.k or DEFAULT_KS)
    common = dict(ks=ks, max_per_class=args.max_per_class, min_per_class=args.min_per_class, seed=args.seed,
                  progress=not args.quiet)
    with Workspace(args.db) as ws:  # for writing: an older schema is migrated before anything is read
        if texts is None:
            result = sparse_probing(ws, args.sae, **common)
            dataset = "domains"
        else:
            from workbench.models import load_model

            model = load_model(ws.run_model(resolve_sae(ws, args.sae).run_id), device=args.device, dtype=args.model_dtype)
            result = probe_texts(ws, args.sae, texts.texts, texts.labels, model, **common)
            dataset = texts.source
        probe_id = moe_records.save_probing(ws, result, dataset)
    print(format_table(result))
    print(f"stored as probe run {probe_id} in {args.db}")


# -- flags ------------------------------------------------------------------------------------
def configure_moe(p: argparse.ArgumentParser) -> None:
    from probes.concepts import CONCEPTS
    from probes.moe_request import BUDGETS, MoeRequest
    from probes.routing import FAMILIES
    from probes.unit_kinds import KINDS

    actions = p.add_subparsers(dest="moe_command", required=True, metavar="ACTION", help="one of:")
    q = actions.add_parser("run", help="measure one model (MoE families: " + ", ".join(FAMILIES) + "; dense MLPs are MoEfied)",
                           description="Route (MoE model) or MoEfy (dense model) the chosen layers over domain-balanced "
                                       "corpus text; print and store the k-vs-loss curve, the experts-vs-latents-vs-neurons "
                                       "table and the masking-selectivity matrices.",
                           formatter_class=Formatter, epilog=f"example:\n  {EXAMPLES['run']}")
    q.set_defaults(handler=cmd_moe_run)
    add_db(q, help="workspace (created if missing; an older schema is migrated)")
    add_fields(q, MoeRequest, skip=("device",),
               rename={"layers": "--layer", "n_experts": "--experts", "ks": "--curve", "eval_tokens": "--tokens",
                       "batch_size": "--batch", "budgets": "--budget", "purge_taus": "--purge-tau", "concepts": "--concept"},
               choices={"mask": KINDS, "budgets": BUDGETS, "concepts": CONCEPTS})
    add_device(q)
    add_quiet(q)

    q = actions.add_parser("show", help="print the stored MoE runs and probing results of a workspace",
                           description="print the stored MoE runs and probing results of a workspace",
                           formatter_class=Formatter, epilog=f"example:\n  {EXAMPLES['show']}")
    q.set_defaults(handler=cmd_moe_show)
    add_db(q)
    q.add_argument("--run", type=integer, default=None, help="only this moe run id (default: every run)")


def configure_probe(p: argparse.ArgumentParser) -> None:
    from probes.probe_fit import DEFAULT_KS
    from probes.probe_split import DEFAULT_MAX_PER_CLASS, DEFAULT_MIN_PER_CLASS
    from workbench.data.labelled import LABELLED_SPEC_HELP

    p.set_defaults(handler=cmd_probe)
    add_db(p)
    p.add_argument("--sae", required=True, help="SAE name or id in the workspace (see `workbench info`)")
    p.add_argument("--k", type=integer, action="append", default=None,
                   help=f"features per sparse probe; repeat for several (default: {', '.join(map(str, DEFAULT_KS))})")
    p.add_argument("--max-per-class", type=integer, default=DEFAULT_MAX_PER_CLASS, help="examples kept per class")
    p.add_argument("--min-per-class", type=integer, default=DEFAULT_MIN_PER_CLASS, help="tasks with fewer examples are skipped")
    p.add_argument("--texts", default=None,
                   help=f"probe these labelled texts instead of the corpus domains: {LABELLED_SPEC_HELP} "
                        "(one task per label, run live through the SAE's model)")
    p.add_argument("--text-field", default="text", help="the texts' field or column")
    p.add_argument("--label-field", default="label", help="the labels' field or column")
    p.add_argument("--seed", type=integer, default=0, help="seed of the class balancing and the train/test split")
    add_device(p)
    add_quiet(p)
