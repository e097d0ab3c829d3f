"""`workbench moe ...` and `workbench probe`: the expert and probing subcommands.

``register(sub)`` adds them to the ``workbench`` parser's subcommands (``workbench.cli``
calls it). Every handler checks its arguments before it loads a model or writes, so bad input
ends as one ``workbench: error: ...`` line with exit status 2 and no rows in the workspace.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.errors import WorkbenchError


class ProbeCliError(WorkbenchError):
    """A probe subcommand argument that is invalid on its own."""


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None


def _check_db(db: Path, must_exist: bool) -> None:
    if not db.expanduser().resolve().parent.is_dir():
        raise ProbeCliError(f"workspace directory does not exist: {db.parent} (create it first or choose another --db)")
    if must_exist and not db.exists():
        raise ProbeCliError(f"no workspace at {db}: build one with `workbench cache ... --db {db}`")


# -- handlers ----------------------------------------------------------------------------------
def cmd_moe_run(args: argparse.Namespace) -> None:
    from probes import moe_records
    from probes.moe_runs import MoeRequest, describe, run_moe
    from workbench.workspace import Workspace

    request = MoeRequest(
        model=args.model, layers=tuple(args.layer or ()), n_experts=args.experts, k=args.k, ks=tuple(args.curve or ()),
        sae=args.sae, corpus=args.corpus, eval_tokens=args.tokens, fit_tokens=args.fit_tokens, ctx=args.ctx,
        batch_size=args.batch, seed=args.seed, factor=args.factor, mask=tuple(args.mask) if args.mask else MoeRequest.mask,
        budgets=tuple(args.budget) if args.budget else MoeRequest.budgets, matched_share=args.matched_share,
        purge_taus=tuple(args.purge_tau) if args.purge_tau else MoeRequest.purge_taus,
        concepts=tuple(args.concept) if args.concept else None, device=args.device,
    )
    _check_db(args.db, must_exist=False)
    run_id, result = run_moe(args.db, request, progress=not args.quiet)
    with Workspace(args.db, read_only=True) as ws:
        run = next(r for r in moe_records.runs(ws) if r["moe_run_id"] == run_id)
        print(describe(run, moe_records.comparison(ws, run_id), moe_records.k_curve(ws, run_id),
                       moe_records.selectivity(ws, run_id), moe_records.purge(ws, run_id)))
    print(f"stored as moe run {run_id} in {args.db} ({result.seconds:.0f} s)")


def show_text(ws, run_id: int | None = None) -> str:
    from probes import moe_records
    from probes.moe_runs import describe
    from probes.probing import ProbeRow, ProbingResult, format_table

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
        raise ProbeCliError(f"no moe run {run_id} in {ws.path.name}; stored runs: {known}")
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

    _check_db(args.db, must_exist=True)
    with Workspace(args.db, read_only=True) as ws:
        print(show_text(ws, args.run))


def cmd_probe(args: argparse.Namespace) -> None:
    from probes import moe_records
    from probes.probing import DEFAULT_KS, format_table, probe_texts, sparse_probing
    from workbench.workspace import Workspace, ensure_writable, resolve_sae

    from data.labelled import load_labelled

    _check_db(args.db, must_exist=True)
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

            model = load_model(ws.run_model(resolve_sae(ws, args.sae).run_id), device=args.device)
            result = probe_texts(ws, args.sae, texts.texts, texts.labels, model, **common)
            dataset = texts.source
        probe_id = moe_records.save_probing(ws, result, dataset)
    print(format_table(result))
    print(f"stored as probe run {probe_id} in {args.db}")


# -- parser ------------------------------------------------------------------------------------
def register(sub) -> None:
    """Add `moe run`, `moe show` and `probe` to the ``workbench`` subparsers ``sub``."""
    from data.labelled import LABELLED_SPEC_HELP
    from probes.experts import CONCEPTS
    from probes.moe_runs import BUDGETS, DEFAULT_EXPERTS, DEFAULT_K, DEFAULT_PURGE_TAUS, KINDS
    from probes.probing import DEFAULT_MAX_PER_CLASS, DEFAULT_MIN_PER_CLASS
    from probes.routing import FAMILIES

    moe = sub.add_parser("moe", help="MoE expert monosemanticity: router capture, MoEfication, masking, vs SAE latents and neurons",
                         description="MoE expert monosemanticity (Monet; MoE-X; MoEfication): routing mass, skew "
                                     "specialisation, entropy, purity, MI and masking selectivity per domain and token concept")
    moe_sub = moe.add_subparsers(dest="moe_command", required=True, metavar="ACTION")

    p = moe_sub.add_parser("run", help="measure one model (MoE families: " + ", ".join(FAMILIES) + "; dense MLPs are MoEfied)",
                           description="Route (MoE model) or MoEfy (dense model) the chosen layers over domain-balanced corpus "
                                       "text; print and store the k-vs-loss curve, the experts-vs-latents-vs-neurons table "
                                       "and the masking-selectivity matrices.")
    p.set_defaults(handler=cmd_moe_run)
    p.add_argument("--db", type=Path, required=True, help="workspace (created if missing; an older schema is migrated)")
    p.add_argument("--model", default=None, help="alias, local HF directory or hub id (default: the workspace's model, else smollm2-135m)")
    p.add_argument("--layer", type=_integer, action="append", help="block index; repeat (default: the SAE's layer, else the middle one; all MoE layers)")
    p.add_argument("--experts", type=_integer, default=None, help=f"MoEfication: experts per layer, must divide d_mlp (default {DEFAULT_EXPERTS})")
    p.add_argument("--k", type=_integer, default=None, help=f"MoEfication: experts kept per token (default {DEFAULT_K})")
    p.add_argument("--curve", type=_integer, action="append",
                   help="k of the k-vs-loss curve; repeat (default: powers of two below E, and --k; a MoE model: up to E)")
    p.add_argument("--sae", default=None, help="SAE name or id in the workspace whose latents join the comparison")
    p.add_argument("--corpus", default=None, help="corpus spec (default: the workspace's corpus, else stdlib)")
    p.add_argument("--tokens", type=_integer, default=512, help="evaluation tokens per domain")
    p.add_argument("--fit-tokens", type=_integer, default=1024, help="tokens per domain for the partition and the specialists")
    p.add_argument("--ctx", type=_integer, default=128, help="context length, BOS included")
    p.add_argument("--batch", type=_integer, default=24, help="contexts per forward (memory grows with it: logits are batch × ctx × vocab)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--factor", type=float, default=2.0, help="Monet skew factor (specialised: mass ≥ factor × runner-up)")
    p.add_argument("--mask", action="append", help=f"kind whose specialists are masked and purged: {', '.join(KINDS)}; repeat (default: all present)")
    p.add_argument("--budget", action="append", help=f"masking budget: {', '.join(BUDGETS)} (skew: Monet's specialists; matched: "
                                                     "--matched-share of every kind's units); repeat (default: both)")
    p.add_argument("--matched-share", type=float, default=1 / 16, help="matched budget: share of each kind's units removed per target (default 1/16)")
    p.add_argument("--purge-tau", type=float, action="append",
                   help="concept purge: remove units whose correlation with the concept exceeds τ; repeat "
                        f"(default {', '.join(map(str, DEFAULT_PURGE_TAUS))})")
    p.add_argument("--concept", action="append", help=f"token concept: {', '.join(CONCEPTS)}; repeat (default: all)")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = moe_sub.add_parser("show", help="print the stored MoE runs and probing results of a workspace")
    p.set_defaults(handler=cmd_moe_show)
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--run", type=_integer, default=None, help="only this moe run id")

    p = sub.add_parser("probe", help="SAEBench sparse probing of an SAE's latents on the corpus's domain tasks (stored)",
                       description="SAEBench sparse probing: mean-pooled SAE latents vs raw residual dimensions at k "
                                   "features, and a full linear probe, on one binary task per corpus domain.")
    p.set_defaults(handler=cmd_probe)
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--sae", required=True, help="SAE name or id in the workspace (see `workbench info`)")
    p.add_argument("--k", type=_integer, action="append", help="features per sparse probe; repeat (default 1, 2, 5)")
    p.add_argument("--max-per-class", type=_integer, default=DEFAULT_MAX_PER_CLASS)
    p.add_argument("--min-per-class", type=_integer, default=DEFAULT_MIN_PER_CLASS, help="tasks with fewer examples are skipped")
    p.add_argument("--texts", default=None,
                   help=f"probe these labelled texts instead of the corpus domains: {LABELLED_SPEC_HELP} "
                        "(one task per label, run live through the SAE's model)")
    p.add_argument("--text-field", default="text", help="the texts' field or column (default: text)")
    p.add_argument("--label-field", default="label", help="the labels' field or column (default: label)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
