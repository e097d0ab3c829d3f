"""``workbench`` command line: one subcommand per job, ``--help`` on each.

Bad input ends with one line on stderr (``workbench: error: ...``) and exit status 2; nothing
is written to the workspace before every argument has been checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from data import CORPUS_SPEC_HELP, CorpusError
from workbench.errors import WorkbenchError

USER_ERRORS = (WorkbenchError, CorpusError)
DEFAULT_DB = Path("workspaces/default.duckdb")
DEMO = dict(model="smollm2-135m", hook="blocks.15.hook_resid_post", corpus="stdlib", tokens=65_536, ctx=128)


class CliError(WorkbenchError):
    """A command-line argument that is invalid on its own."""


# -- subcommands --------------------------------------------------------------------------
def cmd_hooks(args: argparse.Namespace) -> None:
    from workbench.hooks import hook_shapes
    from workbench.models import load_model

    loaded = load_model(args.model, device=args.device)
    shapes = hook_shapes(loaded.model)
    width = max(map(len, shapes))
    for name, shape in shapes.items():
        print(f"{name:<{width}}  {shape}")


def _check_db_path(db: Path) -> None:
    if not db.expanduser().resolve().parent.is_dir():
        raise CliError(f"workspace directory does not exist: {db.parent} (create it first or choose another --db)")


def cmd_cache(args: argparse.Namespace) -> None:
    summary = run_cache(
        db=args.db, model=args.model, hooks=args.hook, corpus=args.corpus, tokens=args.tokens,
        ctx=args.ctx, batch=args.batch, seed=args.seed, dtype=args.dtype, device=args.device,
    )
    print(
        f"run {summary.run_id}: {summary.n_contexts} contexts, {summary.n_tokens:,} tokens at "
        f"{', '.join(summary.hooks)} ({summary.bytes_per_token:.0f} bytes per token and hook); "
        f"{'resumed after ' + str(summary.resumed_from) + ' contexts' if summary.resumed_from else 'fresh run'}"
    )


def run_cache(*, db: Path, model: str, hooks: Sequence[str], corpus: str, tokens: int, ctx: int,
              batch: int = 16, seed: int = 0, dtype: str = "float16", device: str | None = None, progress: bool = True):
    """Check everything, then cache. Cheap checks come first so bad input fails fast."""
    from data import load_corpus
    from workbench.caching import ActivationCacher, CacheRequest
    from workbench.models import load_model
    from workbench.workspace import Workspace

    request = CacheRequest(model=model, hooks=tuple(hooks), corpus=corpus, tokens=tokens, ctx_len=ctx,
                           batch_size=batch, seed=seed, dtype=dtype)
    _check_db_path(db)
    if db.exists():  # fail now, not after loading the model, if another process is writing
        Workspace(db, read_only=True).close()
    loaded = load_model(model, device=device)
    from workbench.caching import validate_request

    validate_request(loaded, request)
    documents = load_corpus(corpus)
    with Workspace(db) as ws:
        return ActivationCacher(ws, loaded, documents, request).run(progress=progress)


def cmd_info(args: argparse.Namespace) -> None:
    from workbench.workspace import Workspace

    with Workspace(args.db, read_only=True) as ws:
        print(workspace_summary(ws))


def workspace_summary(ws) -> str:
    lines = [f"workspace {ws.path} (schema v{ws.schema_version()})"]
    for run_id, kind, model, spec, ctx, status, n_ctx in ws.query(
        """SELECT r.run_id, r.kind, r.model, c.spec, r.ctx_len, r.status,
                  (SELECT count(*) FROM contexts x WHERE x.run_id = r.run_id)
           FROM runs r JOIN corpora c USING (corpus_id) ORDER BY r.run_id"""
    ):
        lines.append(f"  run {run_id} [{kind}, {status}] model={model} corpus={spec.split('#')[0]} "
                     f"ctx={ctx} contexts={n_ctx} tokens={n_ctx * ctx:,}")
    for run_id, _, hook, d, stored in ws.cached_hooks():
        lines.append(f"    {hook}: d={d}, {stored} contexts stored")
    for domain, n_tokens in ws.query(
        """SELECT coalesce(d.domain, '(bos/separator)'), count(*) FROM tokens t
           JOIN contexts c USING (context_id) JOIN runs r USING (run_id)
           LEFT JOIN documents d ON d.corpus_id = r.corpus_id AND d.doc_id = t.doc_id
           GROUP BY 1 ORDER BY 2 DESC"""
    ):
        lines.append(f"  tokens in domain {domain}: {n_tokens:,}")
    size = ws.path.stat().st_size
    lines.append(f"  file size {size / 2**20:.1f} MiB")
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> None:
    from workbench.activations import export_parquet
    from workbench.workspace import Workspace

    with Workspace(args.db, read_only=True) as ws:
        out = export_parquet(ws, args.out, hooks=args.hook)
    print(f"exported to {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    db: Path = args.db
    db.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the default workspace at {db} ({DEMO['model']}, corpus {DEMO['corpus']}, "
          f"{DEMO['tokens']:,} tokens at {DEMO['hook']}); reruns reuse it", file=sys.stderr)
    run_cache(db=db, model=DEMO["model"], hooks=[DEMO["hook"]], corpus=DEMO["corpus"], tokens=DEMO["tokens"],
              ctx=DEMO["ctx"], device=args.device)
    from workbench.workspace import Workspace

    with Workspace(db, read_only=True) as ws:
        print(workspace_summary(ws))


# -- parser -------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Interpretability workbench for sparse features.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    def model_arg(p, default="smollm2-135m"):
        p.add_argument("--model", default=default, help="alias (smollm2-135m, tiny-llama), local HF directory or hub id")
        p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

    p = add("hooks", cmd_hooks, "list every hook name of a model with its activation shape")
    model_arg(p)

    p = add("cache", cmd_cache, "cache activations at one or more hooks into a workspace (resumable)")
    model_arg(p)
    p.add_argument("--hook", action="append", required=True, help="hook name; repeat for several (one forward serves all)")
    p.add_argument("--corpus", default="stdlib", help=CORPUS_SPEC_HELP)
    p.add_argument("--tokens", type=_positive_int, required=True, help="tokens to cache (rounded up to whole contexts)")
    p.add_argument("--ctx", type=_positive_int, default=128, help="context length in tokens, BOS included")
    p.add_argument("--batch", type=_positive_int, default=16, help="contexts per forward pass and per committed transaction")
    p.add_argument("--seed", type=int, default=0, help="document shuffle seed (recorded in the run)")
    p.add_argument("--dtype", default="float16", help="storage dtype: float16 or bfloat16 (2 bytes per dimension)")
    p.add_argument("--db", type=Path, required=True, help="workspace file (created if missing)")

    p = add("info", cmd_info, "summarise a workspace: runs, cached hooks, tokens per domain")
    p.add_argument("--db", type=Path, required=True)

    p = add("export", cmd_export, "export tables and activations to partitioned Parquet")
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--hook", action="append", help="only these hooks (default: all)")

    p = add("demo", cmd_demo, "build the default workspace if missing and summarise it")
    p.add_argument("--db", type=Path, default=DEFAULT_DB)
    p.add_argument("--device", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_third_party()
    try:
        args.handler(args)
    except USER_ERRORS as err:
        print(f"workbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("workbench: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def _quiet_third_party() -> None:
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
