"""``workbench`` command line: one subcommand per job, ``--help`` on each.

Bad input ends with one line on stderr (``workbench: error: ...``) and exit status 2; nothing
is written to the workspace before every argument has been checked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from data import CORPUS_SPEC_HELP
from workbench.errors import WorkbenchError, report

DEFAULT_DB = Path("workspaces/default.duckdb")
DEMO = dict(model="smollm2-135m", hook="blocks.15.hook_resid_post", corpus="stdlib", tokens=65_536, ctx=128)
DEMO_SAE = dict(name="demo-topk", arch="topk", width=2304, k=32, train_tokens=524_288)


class CliError(WorkbenchError):
    """A command-line argument that is invalid on its own."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as ``CliError`` (one line, through ``main``'s one exit path)
    instead of a usage block and ``sys.exit``."""

    def error(self, message: str):
        raise CliError(f"{message} (see `{self.prog} --help`)")


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


# -- subcommands --------------------------------------------------------------------------
def cmd_hooks(args: argparse.Namespace) -> None:
    from workbench.hooks import hook_shapes
    from workbench.models import load_model

    loaded = load_model(args.model, device=args.device)
    shapes = hook_shapes(loaded.model)
    width = max(map(len, shapes))
    for name, shape in shapes.items():
        print(f"{name:<{width}}  {shape}")


def cmd_cache(args: argparse.Namespace) -> None:
    from workbench.caching import run_cache

    summary = run_cache(
        db=args.db, model=args.model, hooks=args.hook, corpus=args.corpus, tokens=args.tokens,
        ctx=args.ctx, batch=args.batch, seed=args.seed, dtype=args.dtype, device=args.device,
    )
    print(
        f"run {summary.run_id}: {summary.n_contexts} contexts, {summary.n_tokens:,} tokens at "
        f"{', '.join(summary.hooks)} ({summary.bytes_per_token:.0f} bytes per token and hook); "
        f"{'resumed after ' + str(summary.resumed_from) + ' contexts' if summary.resumed_from else 'fresh run'}"
    )


def cmd_info(args: argparse.Namespace) -> None:
    from workbench.workspace import Workspace

    with Workspace(args.db, read_only=True) as ws:
        print(workspace_summary(ws))


def workspace_summary(ws) -> str:
    lines = [f"workspace {ws.path} (schema v{ws.schema_version()})"]
    for run in ws.runs():
        lines.append(f"  run {run['run']} [{run['kind']}, {run['status']}] model={run['model']} corpus={run['corpus']} "
                     f"ctx={run['ctx_len']} contexts={run['contexts']} tokens={run['tokens']:,}"
                     + (f" error: {run['error']}" if run["error"] else ""))
    for run_id, _, hook, d, stored in ws.cached_hooks():
        lines.append(f"    {hook}: d={d}, {stored} contexts stored")
    from workbench.training import trained_saes

    for sae in trained_saes(ws):
        m = sae["metrics"]
        shown = ", ".join(f"{k}={m[k]:.3f}" for k in ("l0", "fvu", "dead_fraction", "ce_loss_recovered") if k in m)
        lines.append(f"  sae {sae['sae_id']} {sae['name']} [{sae['arch']}, {sae['status']}] {shown}"
                     + (f" error: {sae['error']}" if sae["error"] else ""))
    for sae_id, name, status, error in ws.query(
        "SELECT a.sae_id, s.name, a.status, a.error FROM analyses a JOIN saes s USING (sae_id) WHERE a.status <> 'done' ORDER BY 1"
    ):
        lines.append(f"  analysis of sae {sae_id} {name} [{status}]" + (f" error: {error}" if error else ""))
    for domain, n_tokens in ws.query(
        """SELECT coalesce(d.domain, '(bos/separator)'), count(*) FROM tokens t
           JOIN contexts c USING (context_id) JOIN runs r USING (run_id)
           LEFT JOIN documents d ON d.corpus_id = r.corpus_id AND d.doc_id = t.doc_id
           GROUP BY 1 ORDER BY 2 DESC"""
    ):
        lines.append(f"  tokens in domain {domain}: {n_tokens:,}")
    size, wal = ws.file_bytes()
    lines.append(f"  file size {size / 2**20:.1f} MiB" + (f" + {wal / 2**20:.1f} MiB in the write-ahead log" if wal else ""))
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> None:
    from workbench.activations import export_parquet
    from workbench.workspace import Workspace

    with Workspace(args.db, read_only=True) as ws:
        out = export_parquet(ws, args.out, hooks=args.hook)
    print(f"exported to {out}")


def _model_for_run(ws, hook: str, run_id: int | None, device: str | None):
    from workbench.models import load_model

    run_id = ws.resolve_hook_run(hook, run_id)
    return load_model(ws.run_model(run_id), device=device)


def _print_metrics(trained) -> None:
    shown = ("l0", "fvu", "explained_variance", "cosine", "dead_fraction", "dense_fraction_1pct",
             "ce_clean", "ce_spliced", "ce_zero_ablated", "ce_loss_recovered", "kl_clean_spliced")
    print(f"sae {trained.sae_id} '{trained.name}' saved to {trained.path}")
    for key in shown:
        if key in trained.metrics:
            print(f"  {key:<22} {trained.metrics[key]:.4f}")


def cmd_train(args: argparse.Namespace) -> None:
    import saes
    from workbench.training import train_sae
    from workbench.workspace import Workspace

    sae_fields = dict(arch=args.arch, width=args.width, k=args.k, aux_loss=args.aux_loss, capacity=args.capacity)
    train_cfg = saes.TrainConfig(
        lr=args.lr, batch_size=args.batch_size, total_tokens=args.tokens, seed=args.seed,
        bf16_autocast=args.bf16, checkpoint_every=args.checkpoint_every, warmup_steps=args.warmup_steps,
    )
    saes.SAEConfig(d_in=1, **sae_fields)  # validate the dictionary's fields before touching the workspace
    with Workspace(args.db, create=False) as ws:
        ws.resolve_hook_run(args.hook, args.run)
        model = None if args.no_downstream else _model_for_run(ws, args.hook, args.run, args.device)
        trained = train_sae(ws, args.hook, sae_fields, train_cfg, name=args.name, run_id=args.run, out=args.out, model=model)
    _print_metrics(trained)


def cmd_eval(args: argparse.Namespace) -> None:
    from workbench.training import register_saved
    from workbench.workspace import Workspace

    with Workspace(args.db, create=False) as ws:
        ws.resolve_hook_run(args.hook, args.run)
        model = None if args.no_downstream else _model_for_run(ws, args.hook, args.run, args.device)
        trained = register_saved(ws, args.sae, args.hook, name=args.name, run_id=args.run, model=model)
    _print_metrics(trained)


def cmd_analyze(args: argparse.Namespace) -> None:
    from workbench.analysis import analyze
    from workbench.workspace import Workspace, resolve_sae

    with Workspace(args.db, create=False) as ws:
        record = resolve_sae(ws, args.sae)
        model = None if args.no_logits else _model_for_run(ws, record.hook, record.run_id, args.device)
        summary = analyze(ws, record.sae_id, model=model, batch_contexts=args.batch)
    print(f"sae {summary.sae_id}: {summary.n_tokens:,} tokens, {summary.n_nonzeros:,} nonzeros stored, "
          f"{summary.live_features} live features"
          + (f" (resumed after {summary.resumed_from} contexts)" if summary.resumed_from else ""))


def cmd_sparsity_measure(args: argparse.Namespace) -> None:
    from probes import records
    from probes.runs import describe_measurement, run_measure
    from workbench.workspace import Workspace

    rows = run_measure(args.db, args.model, corpus=args.corpus, ps=args.p, metrics=args.metric, eval_tokens=args.tokens,
                       ctx=args.ctx, calibration_tokens=args.calibration_tokens, batch_size=args.batch, device=args.device,
                       series=args.series, train_tokens=args.train_tokens)
    with Workspace(args.db, read_only=True) as ws:
        for row in rows:
            print(describe_measurement(row, records.layer_ratios(ws, row["measurement_id"])))


def cmd_sparsity_series(args: argparse.Namespace) -> None:
    from probes.series import SeriesPlan, run_series

    plan = SeriesPlan(activations=tuple(args.activation or ("relu", "silu")), d_model=args.d_model, n_layers=args.layers,
                      total_tokens=args.tokens, context=args.ctx, batch_size=args.batch_size, vocab_size=args.vocab,
                      n_checkpoints=args.checkpoints, width_depth_ratios=tuple(args.ratio or ()),
                      width_depth_activation=args.ratio_activation, p=args.p, eval_rows=args.eval_rows,
                      calibration_tokens=args.calibration_tokens, corpus=args.corpus, seed=args.seed,
                      threads=args.threads)
    out = args.out or args.db.with_name(args.db.name + ".series")
    run_series(args.db, out, plan)


def cmd_sparsity_fit(args: argparse.Namespace) -> None:
    from probes.runs import describe_fit, run_fit
    from probes.records import metric_label
    from workbench.workspace import Workspace

    label = metric_label(args.metric, None if args.metric == "zero" else args.p)
    with Workspace(args.db, create=False) as ws:
        print(describe_fit(args.series, label, run_fit(ws, args.series, args.law, label)))


def cmd_sparsity_show(args: argparse.Namespace) -> None:
    from probes.runs import summary
    from workbench.workspace import Workspace

    with Workspace(args.db, read_only=True) as ws:
        print(summary(ws))


def serve_app(db: Path, port: int, address: str = "127.0.0.1") -> None:
    """Replace this process with Streamlit serving the app for workspace ``db`` on ``address:port``
    (exec, so signals such as SIGTERM reach the server itself)."""
    import os

    import app

    from workbench.workspace import Workspace

    check_address(address, port)
    if db.exists():
        Workspace(db).close()  # migrates an older schema once (the app itself only reads)
    Workspace(db, read_only=True).close()  # a clear error now beats a broken page later
    home = Path(app.__file__).with_name("Home.py")
    env = dict(os.environ, WORKBENCH_DB=str(db.expanduser().resolve()))
    print(f"serving the workbench for {db} on http://{address}:{port}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "streamlit", "run", str(home), "--server.address", address,
                               "--server.port", str(port), "--server.headless", "true",
                               "--browser.gatherUsageStats", "false"], env)


def check_address(address: str, port: int) -> None:
    """Refuse a port outside 1–65535 or an address that is not an IP literal or ``localhost``;
    warn on stderr when the app would listen beyond this machine."""
    import ipaddress

    if not 1 <= port <= 65535:
        raise CliError(f"--port must be between 1 and 65535, got {port}")
    if address == "localhost":
        return
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise CliError(f"--address must be an IP address such as 127.0.0.1 or ::1 (or localhost), got {address!r}") from None
    if not ip.is_loopback:
        print(f"workbench: warning: serving on {address} exposes the app beyond this machine; it has no authentication, "
              "and anyone who reaches it can run the model and write steering specs into the workspace", file=sys.stderr)


def cmd_app(args: argparse.Namespace) -> None:
    serve_app(args.db, args.port, args.address)


def cmd_steer(args: argparse.Namespace) -> None:
    from workbench.cli.steer import run_steer_command

    run_steer_command(args)


def _demo_cached(db: Path) -> bool:
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


def cmd_demo(args: argparse.Namespace) -> None:
    import saes
    from workbench.training import train_sae
    from workbench.workspace import Workspace

    db: Path = args.db
    db.parent.mkdir(parents=True, exist_ok=True)
    print(f"default workspace {db}: {DEMO['model']}, corpus {DEMO['corpus']}, {DEMO['tokens']:,} tokens at "
          f"{DEMO['hook']}, a TopK SAE ({DEMO_SAE['width']} latents, k={DEMO_SAE['k']}); finished steps are reused",
          file=sys.stderr)
    if not _demo_cached(db):
        from workbench.caching import run_cache

        run_cache(db=db, model=DEMO["model"], hooks=[DEMO["hook"]], corpus=DEMO["corpus"], tokens=DEMO["tokens"],
                  ctx=DEMO["ctx"], device=args.device)
    with Workspace(db) as ws:
        trained = ws.query("SELECT count(*) FROM saes WHERE name = ? AND status = 'done'", [DEMO_SAE["name"]])[0][0]
        if not trained:
            model = _model_for_run(ws, DEMO["hook"], None, args.device)
            train_cfg = saes.TrainConfig(total_tokens=DEMO_SAE["train_tokens"], batch_size=4096, bf16_autocast=True,
                                         checkpoint_every=20)
            fields = dict(arch=DEMO_SAE["arch"], width=DEMO_SAE["width"], k=DEMO_SAE["k"])
            train_sae(ws, DEMO["hook"], fields, train_cfg, name=DEMO_SAE["name"], model=model)
        analysed = ws.query(
            "SELECT count(*) FROM analyses a JOIN saes s USING (sae_id) WHERE s.name = ? AND a.status = 'done'", [DEMO_SAE["name"]]
        )[0][0]
        if not analysed:
            from workbench.analysis import analyze

            analyze(ws, DEMO_SAE["name"], model=_model_for_run(ws, DEMO["hook"], None, args.device))
    with Workspace(db, read_only=True) as ws:
        print(workspace_summary(ws))
    if not args.no_serve:
        serve_app(db, args.port)


# -- parser -------------------------------------------------------------------------------
def _integer(text: str) -> int:
    """Parse an integer; range checks live in the request dataclasses so messages name the option."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description="Interpretability workbench for sparse features.")
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
    p.add_argument("--tokens", type=_integer, required=True, help="tokens to cache (rounded up to whole contexts)")
    p.add_argument("--ctx", type=_integer, default=128, help="context length in tokens, BOS included")
    p.add_argument("--batch", type=_integer, default=16, help="contexts per forward pass and per committed transaction")
    p.add_argument("--seed", type=int, default=0, help="document shuffle seed (recorded in the run)")
    p.add_argument("--dtype", default="float16", help="storage dtype: float16 or bfloat16 (2 bytes per dimension)")
    p.add_argument("--db", type=Path, required=True, help="workspace file (created if missing)")

    import saes

    p = add("train", cmd_train, "train one sparse dictionary on a cached hook; saves SAELens layout, records metrics")
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--hook", required=True, help="a cached hook (see `workbench info`)")
    p.add_argument("--run", type=int, default=None, help="cache run id, when several runs cached the hook")
    p.add_argument("--arch", default="topk", help=f"one of: {', '.join(saes.architecture_names())}")
    p.add_argument("--width", type=_integer, required=True, help="number of latents (codes for codebook)")
    p.add_argument("--k", type=_integer, required=True, help="active latents per token (average for batch-level variants)")
    p.add_argument("--tokens", type=_integer, required=True, help="training tokens (epochs over the cache as needed)")
    p.add_argument("--batch-size", type=_integer, default=4096, help="tokens per step")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4 / sqrt(width / 2^14))")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--aux-loss", default="auxk", help="auxk (dead latents), zipf (under-used latents) or none")
    p.add_argument("--capacity", default="uniform", help="feature_choice capacities: uniform or zipf")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the encoder (AMX on CPU, tensor cores on GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between resumable checkpoints")
    p.add_argument("--name", default=None, help="name in the workspace (default: hook.arch.wWIDTH.kK)")
    p.add_argument("--out", type=Path, default=None, help="weights folder (default: beside the workspace, DB.saes/NAME)")
    p.add_argument("--no-downstream", action="store_true", help="skip CE loss recovered / KL (no model load)")
    p.add_argument("--device", default=None)

    p = add("eval", cmd_eval, "evaluate an SAE saved in SAELens layout on a cached hook and record it")
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--sae", type=Path, required=True, help="folder with cfg.json + safetensors weights")
    p.add_argument("--hook", required=True)
    p.add_argument("--run", type=int, default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--no-downstream", action="store_true")
    p.add_argument("--device", default=None)

    p = add("analyze", cmd_analyze, "store every nonzero latent of an SAE over the cache, plus per-feature statistics (resumable)")
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--sae", required=True, help="SAE name or id in the workspace (see `workbench info`)")
    p.add_argument("--batch", type=_integer, default=64, help="contexts per committed transaction")
    p.add_argument("--no-logits", action="store_true", help="skip logit effects (no model load)")
    p.add_argument("--device", default=None)

    p = add("app", cmd_app, "serve the feature browser (Streamlit) for a workspace")
    p.add_argument("--db", type=Path, default=DEFAULT_DB)
    p.add_argument("--port", type=_integer, default=8501)
    p.add_argument("--address", default="127.0.0.1", help="bind address (default: this machine only)")

    p = add("steer", cmd_steer, "generate with and without steering an SAE feature; print both and the measured effect")
    p.add_argument("--db", type=Path, default=None, help="workspace: SAE names, feature units, neutral text, the model")
    p.add_argument("--sae", default=None, help="SAE name in the workspace, or an SAE folder (SAELens layout)")
    p.add_argument("--feature", type=_integer, default=None, help="feature (latent) index; code index for --method code")
    p.add_argument("--strength", type=float, default=1.0, help="add: multiple of --unit; clamp: latent value (x --unit)")
    p.add_argument("--method", default="add", help="add, clamp, ablate or code")
    p.add_argument("--unit", default=None, help="raw, feature_max or feature_p99 (default for add; needs --db)")
    p.add_argument("--code-mode", default=None, help="code only: replace_lowest (default) or replace_all")
    p.add_argument("--hook", default=None, help="hook to steer (default: the workspace SAE's hook)")
    p.add_argument("--spec", type=Path, default=None, help="steering spec JSON file (replaces --sae/--feature/...)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_integer, default=40)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both generations")
    p.add_argument("--model", default=None, help="default: the model that cached the hook, else smollm2-135m")
    p.add_argument("--device", default=None)

    sparsity = sub.add_parser("sparsity", help="activation sparsity of MLP neurons: CETT / PPL-p%%, exact zeros, law fits",
                              description="activation sparsity of MLP neurons (Luo et al. 2024; Li et al. 2022)")
    sparsity_sub = sparsity.add_subparsers(dest="sparsity_command", required=True, metavar="ACTION")
    from probes.laws import law_names
    from probes.sparsity import metric_names

    metric_help = f"one of: {', '.join(metric_names())}; repeat for several (default: cett and zero)"
    p = sparsity_sub.add_parser("measure", help="per-layer activation ratio of a model at PPL-p%% (recorded in the workspace)")
    p.set_defaults(handler=cmd_sparsity_measure)
    model_arg(p)
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--corpus", default="stdlib", help="held-out text: " + CORPUS_SPEC_HELP)
    p.add_argument("--p", type=float, action="append", help="PPL-p%%: allowed perplexity rise in percent; repeat (default 1)")
    p.add_argument("--metric", action="append", help=metric_help)
    p.add_argument("--tokens", type=_integer, default=16_384, help="held-out evaluation tokens")
    p.add_argument("--ctx", type=_integer, default=256, help="evaluation context length")
    p.add_argument("--calibration-tokens", type=_integer, default=2048, help="tokens whose dense activations set thresholds")
    p.add_argument("--batch", type=_integer, default=8, help="contexts per forward")
    p.add_argument("--series", default=None, help="record this model as a checkpoint of a series (then `sparsity fit`)")
    p.add_argument("--train-tokens", type=_integer, default=None, help="with --series: the checkpoint's training tokens")

    p = sparsity_sub.add_parser("series", help="train small ReLU/SiLU models on this CPU, measure every checkpoint, fit the laws")
    p.set_defaults(handler=cmd_sparsity_series)
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None, help="checkpoints folder (default: beside the workspace, DB.series/)")
    p.add_argument("--activation", action="append", help="relu or silu; repeat (default: both)")
    p.add_argument("--d-model", type=_integer, default=128)
    p.add_argument("--layers", type=_integer, default=4)
    p.add_argument("--tokens", type=_integer, default=2_000_000, help="training tokens per model")
    p.add_argument("--ctx", type=_integer, default=128, help="tokens per training row")
    p.add_argument("--batch-size", type=_integer, default=32, help="rows per optimizer step")
    p.add_argument("--vocab", type=_integer, default=4096, help="BPE vocabulary trained on the corpus")
    p.add_argument("--checkpoints", type=_integer, default=8, help="log-spaced checkpoints per model")
    p.add_argument("--ratio", type=float, action="append", help="extra model at this d_model/n_layers, same parameter count; repeat")
    p.add_argument("--ratio-activation", default="relu", help="activation of the width/depth models")
    p.add_argument("--p", type=float, default=1.0, help="PPL-p%% for the CETT activation ratio")
    p.add_argument("--eval-rows", type=_integer, default=64, help="held-out rows for perplexity")
    p.add_argument("--calibration-tokens", type=_integer, default=2048)
    p.add_argument("--corpus", default="stdlib", help=CORPUS_SPEC_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_integer, default=1, help="torch threads for training (default 1: small models lose 10x when cores are shared)")

    p = sparsity_sub.add_parser("fit", help="fit a sparsity law to a series' checkpoints (Levenberg-Marquardt)")
    p.set_defaults(handler=cmd_sparsity_fit)
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--series", required=True)
    p.add_argument("--law", required=True, help=f"one of: {', '.join(law_names())}")
    p.add_argument("--metric", default="cett", help="the metric whose activation ratio is fitted")
    p.add_argument("--p", type=float, default=1.0, help="its PPL-p%% (ignored for zero)")

    p = sparsity_sub.add_parser("show", help="print every sparsity measurement and fit in a workspace")
    p.set_defaults(handler=cmd_sparsity_show)
    p.add_argument("--db", type=Path, required=True)

    from workbench.cli.probes import register as register_probes

    register_probes(sub)  # workbench moe ..., workbench probe

    p = add("info", cmd_info, "summarise a workspace: runs, cached hooks, tokens per domain")
    p.add_argument("--db", type=Path, required=True)

    p = add("export", cmd_export, "export tables and activations to partitioned Parquet")
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--hook", action="append", help="only these hooks (default: all)")

    p = add("demo", cmd_demo, "build the default workspace if missing (cache, TopK SAE, analysis) and serve the app")
    p.add_argument("--db", type=Path, default=DEFAULT_DB)
    p.add_argument("--device", default=None)
    p.add_argument("--port", type=_integer, default=8501)
    p.add_argument("--no-serve", action="store_true", help="build and summarise only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every failure ends here as one line on stderr: exit status 2 for bad
    input, 1 for a failure of the machine or a bug (``WORKBENCH_DEBUG=1`` shows its traceback)."""
    import os

    try:
        args = build_parser().parse_args(argv)
        check_text_arguments(args)
        _quiet_third_party()
        args.handler(args)
    except KeyboardInterrupt:
        print("workbench: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:
        outcome = report(err)
        if outcome.bug and os.environ.get("WORKBENCH_DEBUG"):
            raise
        print(f"workbench: error: {outcome.line}", file=sys.stderr)
        return outcome.status
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
