"""``workbench sparsity measure | series | fit | show``: activation sparsity of MLP neurons
(CETT / PPL-p%, exact zeros, law fits)."""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.cli.options import Formatter, add_db, add_device, add_fields, add_model, config_from, integer, number

EXAMPLES = {
    "measure": "workbench sparsity measure --db runs/smol.duckdb --tokens 8192 --p 1 --p 5 --metric cett --metric zero",
    "series": "workbench sparsity series --db runs/laws.duckdb --d-model 64 --layers 4 --tokens 1000000 --checkpoints 8",
    "fit": "workbench sparsity fit --db runs/laws.duckdb --series relu-d64-l4 --law relu --metric zero",
    "show": "workbench sparsity show --db runs/laws.duckdb",
}


def cmd_sparsity_measure(args: argparse.Namespace) -> None:
    from probes import records
    from probes.runs import describe_measurement, run_measure
    from workbench.workspace import Workspace

    rows = run_measure(args.db, args.model, corpus=args.corpus, ps=args.p, metrics=args.metric, eval_tokens=args.tokens,
                       ctx=args.ctx, calibration_tokens=args.calibration_tokens, batch_size=args.batch, device=args.device,
                       model_dtype=args.model_dtype, series=args.series, train_tokens=args.train_tokens)
    with Workspace(args.db, read_only=True) as ws:
        for row in rows:
            print(describe_measurement(row, records.layer_ratios(ws, row["measurement_id"])))


def cmd_sparsity_series(args: argparse.Namespace) -> None:
    from probes.series import SeriesPlan, run_series

    out = args.out or args.db.with_name(args.db.name + ".series")
    run_series(args.db, out, config_from(args, SeriesPlan))


def cmd_sparsity_fit(args: argparse.Namespace) -> None:
    from probes.records import metric_label
    from probes.runs import describe_fit, run_fit
    from workbench.workspace import Workspace

    label = metric_label(args.metric, None if args.metric == "zero" else args.p)
    with Workspace(args.db, create=False) as ws:
        print(describe_fit(args.series, label, run_fit(ws, args.series, args.law, label)))


def cmd_sparsity_show(args: argparse.Namespace) -> None:
    from probes.runs import summary
    from workbench.workspace import Workspace

    with Workspace(args.db, read_only=True) as ws:
        print(summary(ws))


def configure(p: argparse.ArgumentParser) -> None:
    from probes.laws import law_names
    from probes.series import ACTIVATIONS, SeriesPlan
    from probes.sparsity import metric_names
    from workbench.data import CORPUS_SPEC_HELP

    actions = p.add_subparsers(dest="sparsity_command", required=True, metavar="ACTION", help="one of:")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=help.replace("%", "%%"), description=help, formatter_class=Formatter,
                                  epilog=f"example:\n  {EXAMPLES[name]}")

    q = action("measure", "per-layer activation ratio of a model at PPL-p% (recorded in the workspace)")
    q.set_defaults(handler=cmd_sparsity_measure)
    add_db(q, help="workspace file (created if missing)")
    add_model(q)
    add_device(q)
    q.add_argument("--corpus", default="stdlib", help="held-out text: " + CORPUS_SPEC_HELP)
    q.add_argument("--p", type=number, action="append", default=None,
                   help="PPL-p%%: allowed perplexity rise in percent; repeat for several (default: 1)")
    q.add_argument("--metric", action="append", default=None, choices=metric_names(),
                   help="truncation metric; repeat for several (default: cett and zero)")
    q.add_argument("--tokens", type=integer, default=16_384, help="held-out evaluation tokens")
    q.add_argument("--ctx", type=integer, default=256, help="evaluation context length")
    q.add_argument("--calibration-tokens", type=integer, default=2048, help="tokens whose dense activations set thresholds")
    q.add_argument("--batch", type=integer, default=8, help="contexts per forward")
    q.add_argument("--series", default=None, help="record this model as a checkpoint of a series (then `sparsity fit`)")
    q.add_argument("--train-tokens", type=integer, default=None, help="with --series: the checkpoint's training tokens")

    q = action("series", "train small ReLU/SiLU models on this machine, measure every checkpoint, fit the laws")
    q.set_defaults(handler=cmd_sparsity_series)
    add_db(q, help="workspace file (created if missing)")
    q.add_argument("--out", type=Path, default=None, help="checkpoints folder (default: DB.series/ beside the workspace)")
    add_fields(q, SeriesPlan, rename={"activations": "--activation", "n_layers": "--layers", "total_tokens": "--tokens",
                                      "context": "--ctx", "vocab_size": "--vocab", "n_checkpoints": "--checkpoints",
                                      "width_depth_ratios": "--ratio", "width_depth_activation": "--ratio-activation"},
               choices={"activations": ACTIVATIONS, "width_depth_activation": ACTIVATIONS})

    q = action("fit", "fit a sparsity law to a series' checkpoints (Levenberg-Marquardt)")
    q.set_defaults(handler=cmd_sparsity_fit)
    add_db(q)
    q.add_argument("--series", required=True, help="series name (see `workbench sparsity show`)")
    q.add_argument("--law", required=True, choices=law_names(), help="the law to fit")
    q.add_argument("--metric", default="cett", choices=metric_names(), help="the metric whose activation ratio is fitted")
    q.add_argument("--p", type=number, default=1.0, help="its PPL-p%% (ignored for zero)")

    q = action("show", "print every sparsity measurement and fit in a workspace")
    q.set_defaults(handler=cmd_sparsity_show)
    add_db(q)
