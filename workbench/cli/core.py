"""The workspace commands: hooks, cache, info, export, train, eval, analyze, app, demo.

Each command is a ``configure_NAME(parser)`` that adds its flags (from the config dataclasses
where one exists) and a ``cmd_NAME(args)`` handler that checks, then works.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workbench.cli.options import CliError, add_db, add_device, add_fields, add_model, config_from, integer
from workbench.demo import DEMO, DEMO_SAE

DEFAULT_DB = Path("workspaces/default.duckdb")


def cmd_hooks(args: argparse.Namespace) -> None:
    from workbench.hooks import hook_shapes
    from workbench.models import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.model_dtype)
    shapes = hook_shapes(loaded.model)
    width = max(map(len, shapes))
    for name, shape in shapes.items():
        print(f"{name:<{width}}  {shape}")


def cmd_cache(args: argparse.Namespace) -> None:
    from workbench.caching import CacheRequest, cache

    summary = cache(args.db, config_from(args, CacheRequest), device=args.device, model_dtype=args.model_dtype)
    if summary is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    if args.corpus.split(":")[0] == "stdlib":  # the built-in corpus is built once per process: its report costs nothing
        from workbench.data import load_corpus
        from workbench.data.corpus import corpus_report

        print(corpus_report(load_corpus(args.corpus)))
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
    stores = {run_id: (store, url) for run_id, store, url in ws.query("SELECT run_id, store, store_url FROM runs")}
    for run_id, _, hook, d, stored in ws.cached_hooks():
        store, url = stores.get(run_id, ("duckdb", None))
        where = f" in Parquet shards at {url}" if store == "parquet" else ""
        lines.append(f"    {hook}: d={d}, {stored} contexts stored{where}")
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
    from workbench.workspace import Workspace

    if args.features is not None or args.sae is not None or args.format is not None:
        from workbench.feature_export import export_features, parse_feature_range

        if args.sae is None:
            raise CliError("--features and --format export an SAE's feature data: name it with --sae")
        if args.hook or args.layout is not None:
            raise CliError("--hook and --layout apply to activation exports; a feature export takes --sae, --features and --format")
        with Workspace(args.db, read_only=True) as ws:
            summary = export_features(ws, args.sae, args.out, fmt=args.format or "neuronpedia",
                                      features=parse_feature_range(args.features), batch_size=args.batch_size)
        print(f"exported {summary.n_features} features of SAE '{summary.sae}' in {summary.n_batches} batch files "
              f"({summary.format}) to {summary.out}")
        return
    from workbench.export import export_activations

    with Workspace(args.db, read_only=True) as ws:
        out = export_activations(ws, args.out, hooks=args.hook, layout=args.layout or "parquet")
    print(f"exported to {out}")


def model_for_run(ws, hook: str, run_id: int | None, args: argparse.Namespace):
    """The model that cached ``hook`` (of cache run ``run_id`` when several did), loaded on ``--device``
    in ``--model-dtype``."""
    from workbench.models import load_model

    run_id = ws.resolve_hook_run(hook, run_id)
    return load_model(ws.run_model(run_id), device=args.device, dtype=args.model_dtype)


def _print_metrics(trained) -> None:
    shown = ("l0", "fvu", "explained_variance", "cosine", "dead_fraction", "dense_fraction_1pct",
             "ce_clean", "ce_spliced", "ce_zero_ablated", "ce_loss_recovered", "kl_clean_spliced")
    print(f"sae {trained.sae_id} '{trained.name}' saved to {trained.path}")
    for key in shown:
        if key in trained.metrics:
            print(f"  {key:<22} {trained.metrics[key]:.4f}")


def cmd_train(args: argparse.Namespace) -> None:
    import saes
    from workbench.distributed import world
    from workbench.training import train_sae, train_sae_ddp
    from workbench.workspace import Workspace

    sae_cfg = config_from(args, saes.SAEConfig, d_in=1)  # validates the dictionary's fields before the workspace opens
    sae_fields = {k: v for k, v in sae_cfg.to_dict().items() if k != "d_in"}  # d_in comes from the cache
    train_cfg = config_from(args, saes.TrainConfig)
    if world()[1] > 1:  # torchrun: every rank trains, rank 0 records
        def load(ws, run_id):
            return None if args.no_downstream else model_for_run(ws, args.hook, run_id, args)

        trained = train_sae_ddp(args.db, args.hook, sae_fields, train_cfg, name=args.name, run_id=args.run, out=args.out,
                                model_loader=load, device=args.device)
        if trained is not None:
            _print_metrics(trained)
        return
    with Workspace(args.db, create=False) as ws:
        ws.resolve_hook_run(args.hook, args.run)
        model = None if args.no_downstream else model_for_run(ws, args.hook, args.run, args)
        trained = train_sae(ws, args.hook, sae_fields, train_cfg, name=args.name, run_id=args.run, out=args.out, model=model,
                            device=args.device)
    _print_metrics(trained)


def cmd_eval(args: argparse.Namespace) -> None:
    from workbench.pretrained import is_spec, prepare_pretrained
    from workbench.training import register_saved
    from workbench.workspace import Workspace

    folder, hook, name = Path(args.sae), args.hook, args.name
    if hook is None and not is_spec(args.sae):
        raise CliError("--hook is required unless --sae names a pretrained SAE (saelens:RELEASE/SAE_ID)")
    with Workspace(args.db, create=False) as ws:
        if is_spec(args.sae):  # checked against the registry and the workspace, then downloaded and converted once
            got = prepare_pretrained(ws, args.sae, hook=hook, run_id=args.run, name=name,
                                     allow_model_mismatch=args.allow_model_mismatch)
            folder, hook, name = got.folder, got.hook, got.name
        ws.resolve_hook_run(hook, args.run)
        model = None if args.no_downstream else model_for_run(ws, hook, args.run, args)
        trained = register_saved(ws, folder, hook, name=name, run_id=args.run, model=model, device=args.device)
    _print_metrics(trained)


def cmd_analyze(args: argparse.Namespace) -> None:
    from workbench.analysis import analyze
    from workbench.workspace import Workspace, resolve_sae

    with Workspace(args.db, create=False) as ws:
        record = resolve_sae(ws, args.sae)
        model = None if args.no_logits else model_for_run(ws, record.hook, record.run_id, args)
        summary = analyze(ws, record.sae_id, model=model, batch_contexts=args.batch, device=args.device)
    print(f"sae {summary.sae_id}: {summary.n_tokens:,} tokens, {summary.n_nonzeros:,} nonzeros stored, "
          f"{summary.live_features} live features"
          + (f" (resumed after {summary.resumed_from} contexts)" if summary.resumed_from else ""))


def serve_app(db: Path, port: int, address: str = "127.0.0.1") -> None:
    """Replace this process with Streamlit serving the app for workspace ``db`` on ``address:port``
    (exec, so signals such as SIGTERM reach the server itself)."""
    import os

    import workbench.app as app
    from workbench.workspace import Workspace, WorkspaceNeedsMigration

    check_address(address, port)
    try:
        Workspace(db, read_only=True).close()  # a clear error now beats a broken page later
    except WorkspaceNeedsMigration:
        Workspace(db).close()  # migrate an older schema once; the app itself only reads
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


def cmd_demo(args: argparse.Namespace) -> None:
    from workbench.demo import build_demo
    from workbench.workspace import Workspace

    print(f"default workspace {args.db}: {DEMO['model']}, corpus {DEMO['corpus']}, {DEMO['tokens']:,} tokens at "
          f"{DEMO['hook']}, a TopK SAE ({DEMO_SAE['width']} latents, k={DEMO_SAE['k']}) with a pattern label per feature; "
          "finished steps are reused",
          file=sys.stderr)
    seconds = build_demo(args.db, device=args.device, model_dtype=args.model_dtype)
    if any(seconds.values()):
        print("built in " + ", ".join(f"{stage} {s:.0f} s" for stage, s in seconds.items() if s), file=sys.stderr)
    with Workspace(args.db, read_only=True) as ws:
        print(workspace_summary(ws))
    if not args.no_serve:
        serve_app(args.db, args.port)


# -- flags ------------------------------------------------------------------------------------
def configure_hooks(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_hooks)
    add_model(p)
    add_device(p)


def configure_cache(p: argparse.ArgumentParser) -> None:
    from workbench.caching import STORAGE_DTYPES, STORES, CacheRequest

    p.set_defaults(handler=cmd_cache)
    add_db(p, help="workspace file (created if missing; a rerun of the same request resumes it)")
    add_fields(p, CacheRequest, rename={"hooks": "--hook", "ctx_len": "--ctx", "batch_size": "--batch"},
               choices={"dtype": list(STORAGE_DTYPES), "store": list(STORES)})
    add_device(p)


def configure_info(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_info)
    add_db(p)


def configure_export(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_export)
    add_db(p)
    p.add_argument("--out", type=Path, required=True, help="output folder (created; existing files of the same name are replaced)")
    p.add_argument("--hook", action="append", default=None, help="only this cached hook; repeat for several (default: all)")
    p.add_argument("--layout", default=None,
                   help="parquet (default: partitioned Parquet with a dataset card) or saelens (sae-lens cached-activation datasets)")
    p.add_argument("--sae", default=None, help="export this analysed SAE's feature data instead of activations (name or id)")
    p.add_argument("--features", nargs="?", const="all", default=None,
                   help="which features: all (default), N, A-B (inclusive) or a comma list of those")
    p.add_argument("--format", default=None,
                   help="feature data layout: neuronpedia (SAEDashboard's batch-N.json, default) or saedashboard (the same files)")
    p.add_argument("--batch-size", type=integer, default=128, help="features per batch file of a feature export")


def configure_train(p: argparse.ArgumentParser) -> None:
    import saes

    p.set_defaults(handler=cmd_train)
    add_db(p)
    p.add_argument("--hook", required=True, help="a cached hook (see `workbench info`)")
    p.add_argument("--run", type=integer, default=None, help="cache run id, when several runs cached the hook")
    add_fields(p, saes.SAEConfig, skip=("d_in",), choices={"arch": saes.architecture_names()})
    add_fields(p, saes.TrainConfig, skip=("sae", "progress_bar"), rename={"total_tokens": "--tokens", "bf16_autocast": "--bf16"},
               required=("total_tokens",))
    p.add_argument("--name", default=None, help="name in the workspace (default: HOOK.ARCH.wWIDTH.kK)")
    p.add_argument("--out", type=Path, default=None, help="weights folder (default: DB.saes/NAME beside the workspace)")
    p.add_argument("--no-downstream", action="store_true", help="skip CE loss recovered and KL (no model load)")
    add_device(p)


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_eval)
    add_db(p)
    p.add_argument("--sae", required=True, help="folder with cfg.json + safetensors weights (SAELens layout), or a "
                   "sae-lens pretrained SAE as saelens:RELEASE/SAE_ID (RELEASE ends at the first '/')")
    p.add_argument("--hook", default=None, help="the cached hook to evaluate it on (default for saelens: the SAE's own hook)")
    p.add_argument("--run", type=integer, default=None, help="cache run id, when several runs cached the hook")
    p.add_argument("--name", default=None, help="name in the workspace (default: HOOK.FOLDER; for saelens: RELEASE.SAE_ID)")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="register a saelens SAE although its model's name differs from the run's (the same model renamed)")
    p.add_argument("--no-downstream", action="store_true", help="skip CE loss recovered and KL (no model load)")
    add_device(p)


def configure_analyze(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_analyze)
    add_db(p)
    p.add_argument("--sae", required=True, help="SAE name or id in the workspace (see `workbench info`)")
    p.add_argument("--batch", type=integer, default=64, help="contexts per committed transaction")
    p.add_argument("--no-logits", action="store_true", help="skip logit effects (no model load)")
    add_device(p)


def configure_app(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_app)
    add_db(p, required=False, default=DEFAULT_DB)
    p.add_argument("--port", type=integer, default=8501, help="TCP port, 1-65535")
    p.add_argument("--address", default="127.0.0.1",
                   help="bind address; anything but loopback exposes an app without authentication (a warning says so)")


def configure_demo(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_demo)
    add_db(p, required=False, default=DEFAULT_DB)
    add_device(p)
    p.add_argument("--port", type=integer, default=8501, help="TCP port of the app, 1-65535")
    p.add_argument("--no-serve", action="store_true", help="build and summarise only")
