"""``workbench`` command line: one subcommand per job, ``--help`` on each.

This package is the top layer: the only part of ``workbench`` that may import ``probes`` and
``app``. ``COMMANDS`` names every subcommand with its help and the function that adds its flags;
a subcommand's flags (and the heavy imports they need) are built only when that subcommand is
used, so ``workbench --help`` starts at once. Flags come from the configuration dataclasses
(``workbench.cli.options``).

Every failure ends in ``main`` as one line on stderr: exit status 2 for bad input, 1 for a
failure of the machine or a bug; nothing is written before every argument has been checked.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Sequence

from workbench.cli.options import CliError, Formatter
from workbench.errors import report

# name -> (one-line help, "module:function" adding its flags and handler, example)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "hooks": ("list every hook name of a model with its activation shape", "core:configure_hooks",
              "workbench hooks --model tiny-llama"),
    "cache": ("cache activations at one or more hooks into a workspace (resumable)", "core:configure_cache",
              "workbench cache --model smollm2-135m --hook blocks.15.hook_resid_post --tokens 200000 --db ws.duckdb"),
    "train": ("train one sparse dictionary on a cached hook; saves SAELens layout, records metrics", "core:configure_train",
              "workbench train --db ws.duckdb --hook blocks.15.hook_resid_post --arch batchtopk --width 4608 --k 32 "
              "--tokens 2000000"),
    "eval": ("evaluate an SAE saved in SAELens layout on a cached hook and record it", "core:configure_eval",
             "workbench eval --db ws.duckdb --sae path/to/sae_folder --hook blocks.15.hook_resid_post"),
    "analyze": ("store every nonzero latent of an SAE over the cache, plus per-feature statistics (resumable)",
                "core:configure_analyze", "workbench analyze --db ws.duckdb --sae demo-topk"),
    "steer": ("generate with and without steering an SAE feature; print both and the measured effect", "steer:configure",
              'workbench steer --db ws.duckdb --sae demo-topk --feature 464 --strength 4 --prompt "The"'),
    "explain": ("label every feature of an analysed SAE and score the label on held-out text (resumable)", "explain:configure",
                "workbench explain --db ws.duckdb --sae demo-topk --features 0-99 --explainer pattern"),
    "sparsity": ("activation sparsity of MLP neurons: CETT / PPL-p%, exact zeros, law fits", "sparsity:configure",
                 "workbench sparsity measure --db ws.duckdb --tokens 8192 --p 1"),
    "moe": ("MoE expert monosemanticity: router capture, MoEfication, masking, vs SAE latents and neurons",
            "probes:configure_moe", "workbench moe run --db ws.duckdb --sae demo-topk"),
    "probe": ("SAEBench sparse probing of an SAE's latents on the corpus's domains or labelled texts (stored)",
              "probes:configure_probe", "workbench probe --db ws.duckdb --sae demo-topk"),
    "info": ("summarise a workspace: runs, cached hooks, SAEs, failures, tokens per domain", "core:configure_info",
             "workbench info --db ws.duckdb"),
    "export": ("export tables and activations to partitioned Parquet", "core:configure_export",
               "workbench export --db ws.duckdb --out exported/"),
    "app": ("serve the feature browser (Streamlit) for a workspace on 127.0.0.1", "core:configure_app",
            "workbench app --db workspaces/default.duckdb --port 8501"),
    "demo": ("build the default workspace if missing (cache, TopK SAE, analysis) and serve the app", "core:configure_demo",
             "workbench demo --no-serve"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as ``CliError`` (one line, through ``main``'s one exit path)
    instead of a usage block and ``sys.exit``."""

    def error(self, message: str):
        raise CliError(f"{message} (see `{self.prog} --help`)")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("sparse-workbench")
    except PackageNotFoundError:
        return "unknown"


def build_parser(argv: Sequence[str] | None = None, *, every: bool = False) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` gets its flags (all of them with ``every``)."""
    parser = _Parser(prog="workbench", description="Interpretability workbench for sparse features.",
                     epilog="`workbench COMMAND --help` shows each command's flags and an example.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    wanted = next((arg for arg in (argv or []) if not arg.startswith("-")), None)
    for name, (text, where, example) in COMMANDS.items():
        p = sub.add_parser(name, help=text.replace("%", "%%"), description=text, formatter_class=Formatter,
                           epilog=f"example:\n  {example}")
        if every or name == wanted:
            module, function = where.split(":")
            getattr(importlib.import_module(f"workbench.cli.{module}"), function)(p)
    return parser


def check_text_arguments(args: argparse.Namespace) -> None:
    """Refuse arguments that are not valid UTF-8 (the shell passes raw bytes; Python keeps them as
    lone surrogates that would fail deep inside a tokenizer or DuckDB)."""
    for name, value in vars(args).items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, Path)):
                try:
                    str(item).encode("utf-8")
                except UnicodeEncodeError:
                    flag = "--" + name.replace("_", "-")
                    raise CliError(f"{flag} is not valid UTF-8 text") from None


def resolve_compute_arguments(args: argparse.Namespace) -> None:
    """Turn ``--device auto`` and ``--model-dtype auto`` into what they mean on this machine
    (``cpu`` / ``cuda:N``, ``float32`` / ``bfloat16``), checked before anything loads or is written."""
    if getattr(args, "device", None) is None and not hasattr(args, "model_dtype"):
        return
    from workbench.devices import model_dtype, resolve_device

    device = resolve_device(getattr(args, "device", None), what="--device")
    args.device = str(device)
    if hasattr(args, "model_dtype"):
        args.model_dtype = str(model_dtype(args.model_dtype, device)).removeprefix("torch.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every failure ends here as one line on stderr: exit status 2 for bad
    input, 1 for a failure of the machine or a bug (``WORKBENCH_DEBUG=1`` shows its traceback)."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        check_text_arguments(args)
        resolve_compute_arguments(args)
        quiet_third_party()
        args.handler(args)
    except KeyboardInterrupt:
        print("workbench: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`workbench hooks | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        from workbench.distributed import PeerFailed, RankFailed, world

        if isinstance(err, PeerFailed) or (isinstance(err, RankFailed) and world()[0] != 0):  # rank 0 prints the line
            return err.status
        if isinstance(err, RankFailed):
            print(f"workbench: error: {err}", file=sys.stderr)
            return err.status
        outcome = report(err)
        if outcome.bug and os.environ.get("WORKBENCH_DEBUG"):
            raise
        print(f"workbench: error: {outcome.line}", file=sys.stderr)
        return outcome.status
    return 0


def quiet_third_party() -> None:
    """Hide Hugging Face's per-file progress bars and advice; ours show the work that matters."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformer_lens")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
