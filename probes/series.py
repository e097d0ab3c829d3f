"""The offline sparsity-law experiment: train small ReLU and SiLU models, measure every
checkpoint, fit the laws (Luo et al. 2024, "Sparsing Law"; docs/algorithms.md §4).

    corpus ─▶ BPE tokenizer + rows (workbench.tinylm) ─▶ for each series (activation × shape):
        train with log-spaced checkpoints ─▶ each checkpoint: activation ratio at PPL-p% (CETT)
        and exact zeros on held-out rows ─▶ workspace (series, train_tokens)
    ─▶ fits: ReLU series → A(D) = exp(−c·D^α + b) + A₀,  SiLU series → A(D) = A₀ − c/D^α,
             last checkpoint of each width/depth shape → A₀(r) = a + s·min(r, r*)

Everything is resumable: training continues from the newest checkpoint, and checkpoints that
already have a measurement in the workspace are skipped. Fits are recomputed at the end.
A failed fit (too few checkpoints, no convergence) is reported, not fatal: the measurements stand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from probes import records
from probes.laws import LawFitError, fit_law
from probes.sparsity import ZERO, measure
from workbench.errors import WorkbenchError
from workbench.tinylm import ACTIVATIONS, Checkpoint, TinyLMConfig, prepare_token_data, shapes_at_fixed_params, train_tiny_lm
from workbench.workspace import Workspace, ensure_writable

WIDTH_DEPTH_SERIES = "width-depth"
LAW_OF_ACTIVATION = {"relu": "relu", "silu": "silu"}  # which law a series of each activation follows


@dataclass(frozen=True)
class SeriesPlan:
    """What `workbench sparsity series` trains and measures."""

    activations: tuple[str, ...] = ("relu", "silu")
    """One series per activation at the base shape."""
    d_model: int = 128
    """Base shape: residual width."""
    n_layers: int = 4
    """Base shape: depth."""
    total_tokens: int = 2_000_000
    """Training tokens per model."""
    context: int = 128
    """Tokens per training row (BOS included)."""
    batch_size: int = 32
    """Rows per optimizer step."""
    vocab_size: int = 4096
    """BPE vocabulary trained on the corpus."""
    n_checkpoints: int = 8
    """Log-spaced checkpoints per model (the laws need at least 4–5)."""
    width_depth_ratios: tuple[float, ...] = ()
    """Extra models at d_model / n_layers ≈ each ratio, same non-embedding parameter count as the base."""
    width_depth_activation: str = "relu"
    """Activation of the width/depth models."""
    p: float = 1.0
    """PPL-p% for the CETT activation ratio."""
    eval_rows: int = 64
    """Held-out rows (of the series' context length) for perplexity."""
    calibration_tokens: int = 2048
    """Tokens whose dense activations set the CETT thresholds."""
    corpus: str = "stdlib"
    """Training and held-out text."""
    seed: int = 0
    """Seed of the tokenizer's data order, the models' initialisation and the batches."""
    threads: int | None = 1
    """Torch threads while training (None: torch's default). Small models gain little from more
    threads and lose 10× when the cores are shared with another job, so one is the default."""

    def __post_init__(self) -> None:
        bad = [a for a in (*self.activations, self.width_depth_activation) if a not in ACTIVATIONS]
        if bad:
            raise WorkbenchError(f"unknown activation '{bad[0]}'; valid: {', '.join(ACTIVATIONS)}")
        if not (self.p > 0):
            raise WorkbenchError(f"p must be a positive number of percent (PPL-p%), got {self.p}")
        for name in ("d_model", "n_layers", "total_tokens", "context", "batch_size", "vocab_size", "n_checkpoints",
                     "eval_rows", "calibration_tokens"):
            if getattr(self, name) <= 0:
                raise WorkbenchError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")


def series_name(activation: str, d_model: int, n_layers: int) -> str:
    return f"{activation}-d{d_model}-l{n_layers}"


def planned_models(plan: SeriesPlan) -> list[TinyLMConfig]:
    def config(activation: str, d_model: int, n_layers: int) -> TinyLMConfig:
        return TinyLMConfig(activation=activation, d_model=d_model, n_layers=n_layers, total_tokens=plan.total_tokens,
                            context=plan.context, batch_size=plan.batch_size, vocab_size=plan.vocab_size,
                            n_checkpoints=plan.n_checkpoints, seed=plan.seed)

    configs = [config(a, plan.d_model, plan.n_layers) for a in plan.activations]
    if plan.width_depth_ratios:
        target = config(plan.width_depth_activation, plan.d_model, plan.n_layers).non_embedding_params
        for shape in dict.fromkeys(shapes_at_fixed_params(target, plan.width_depth_ratios)):
            cfg = config(plan.width_depth_activation, shape.d_model, shape.n_layers)
            if all((c.activation, c.d_model, c.n_layers) != (cfg.activation, cfg.d_model, cfg.n_layers) for c in configs):
                configs.append(cfg)
    return configs


def run_series(db: Path, out_root: Path, plan: SeriesPlan, *, progress: bool = True, log=print) -> None:
    """Train, measure and fit everything in ``plan``; safe to interrupt and rerun."""
    from workbench.data import load_corpus
    from workbench.models import load_model

    ensure_writable(db)
    configs = planned_models(plan)
    data = prepare_token_data(load_corpus(plan.corpus), out_root / "data", vocab_size=plan.vocab_size,
                              context=plan.context, seed=plan.seed)
    heldout = data.heldout[: plan.eval_rows]  # (rows, context)
    label = records.metric_label("cett", plan.p)

    for cfg in configs:
        name = series_name(cfg.activation, cfg.d_model, cfg.n_layers)
        log(f"series {name}: {cfg.non_embedding_params:,} non-embedding parameters, {cfg.total_tokens:,} tokens, "
            f"{plan.n_checkpoints} checkpoints")

        def measure_checkpoint(ck: Checkpoint, name: str = name) -> None:
            model = f"{name}/{ck.path.name}"
            with Workspace(db) as ws:
                done = all(records.is_measured(ws, model, m, p, name, ck.tokens) for m, p in (("cett", plan.p), (ZERO, None)))
            if done:
                return
            loaded = load_model(str(ck.path), device="cpu")
            results = measure(loaded.model, heldout, metrics=["cett", ZERO], ps=[plan.p],  # one batch: small models
                              calibration_tokens=plan.calibration_tokens, batch_size=len(heldout), progress=False)
            with Workspace(db) as ws:
                records.save_measurements(ws, results, model=model, shape=records.model_shape(loaded.model),
                                          corpus=plan.corpus, eval_tokens=int(heldout[:, 1:].numel()),
                                          series=name, train_tokens=ck.tokens)
            by_metric = {m.metric: m for m in results}
            log(f"  {ck.tokens:>10,} tokens: held-out loss {ck.heldout_loss:.3f}, {label} activation ratio "
                f"{by_metric['cett'].activation_ratio:.3f}, nonzero {by_metric[ZERO].activation_ratio:.3f}")

        for ck in train_tiny_lm(cfg, data, out_root / name, on_checkpoint=measure_checkpoint, progress=progress,
                                num_threads=plan.threads):
            measure_checkpoint(ck)  # checkpoints trained in an earlier, interrupted run

    with Workspace(db) as ws:
        for line in fit_all(ws, configs, plan):
            log(line)


def fit_all(ws: Workspace, configs: list[TinyLMConfig], plan: SeriesPlan) -> list[str]:
    """Fit each series' law (CETT and, for ReLU, exact zeros) and the width/depth law; store them."""
    from probes.runs import describe_fit

    label = records.metric_label("cett", plan.p)
    lines = []
    for cfg in configs:
        name = series_name(cfg.activation, cfg.d_model, cfg.n_layers)
        labels = [label, ZERO] if cfg.activation == "relu" else [label]
        for metric in labels:
            points = records.series_points(ws, name, metric)
            try:
                fit = fit_law(LAW_OF_ACTIVATION[cfg.activation], [t for t, _ in points], [a for _, a in points])
            except LawFitError as err:
                lines.append(f"{name} [{metric}]: no fit ({err})")
                continue
            records.save_fit(ws, name, metric, fit)
            lines.append(describe_fit(name, metric, fit))
    shapes = [c for c in configs if c.activation == plan.width_depth_activation]
    if len({(c.d_model, c.n_layers) for c in shapes}) < 2:
        return lines
    for metric in [label, ZERO] if plan.width_depth_activation == "relu" else [label]:
        ratios, limits = [], []
        for cfg in shapes:
            points = records.series_points(ws, series_name(cfg.activation, cfg.d_model, cfg.n_layers), metric)
            if points:
                ratios.append(cfg.d_model / cfg.n_layers)
                limits.append(max(points)[1])  # the last checkpoint stands in for the limit A₀
        try:
            fit = fit_law("width_depth", ratios, limits)
        except LawFitError as err:
            lines.append(f"{WIDTH_DEPTH_SERIES} [{metric}]: no fit ({err})")
            continue
        records.save_fit(ws, WIDTH_DEPTH_SERIES, metric, fit)
        lines.append(describe_fit(WIDTH_DEPTH_SERIES, metric, fit))
    return lines
