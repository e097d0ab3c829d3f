"""The app's only door to the library: cached wrappers over workbench functions.

Every wrapper opens the workspace read-only for the length of one call and closes it again.
A connection held across reruns would keep DuckDB's file lock, so `workbench cache`, `train`
or `analyze` would fail with "workspace busy" for as long as a browser tab is open. Results are
cached by ``st.cache_data`` under the workspace path *and* its change stamp (modification times
of the file and its write-ahead log), so an unchanged workspace costs nothing on a rerun and a
changed one (a new SAE, a finished analysis) is read afresh: ``per_workspace_version`` turns a read
``fn(path, ...)`` into that cached one.

Pages never catch library exceptions themselves: they pass a wrapper to ``call``, which turns
"workspace busy" into a warning with a Retry button and every other user-facing error into one
``st.error`` line.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from workbench.errors import report
from workbench.workspace import Workspace, WorkspaceBusy, change_stamp, resolve_sae

ENV_VAR = "WORKBENCH_DB"


# -- the workspace ----------------------------------------------------------------------------
def workspace_path() -> str:
    """The workspace named by ``WORKBENCH_DB``; without it the page shows how to start the app."""
    value = os.environ.get(ENV_VAR)
    if not value:
        st.error(f"{ENV_VAR} is not set: start the browser with `workbench app --db WORKSPACE`")
        st.stop()
    return str(Path(value).expanduser().resolve())


stamp = change_stamp  # the workspace's version: modification times of its file and its WAL


def _open(path: str) -> Workspace:
    return Workspace(path, read_only=True)


def per_workspace_version(*, max_entries: int, show_spinner: bool | str = False) -> Callable[[Callable], Callable]:
    """A read ``fn(path, ...)`` cached by ``st.cache_data`` under its arguments and the workspace's ``stamp``.

    The decorated name is the public read: it takes ``fn``'s own arguments and adds the stamp itself, so a
    changed workspace (a new SAE, a finished analysis) is read afresh and an unchanged one costs nothing.
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)  # st.cache_data keys a cache on fn's module, name and source: one per read
        def at_version(*args: Any, workspace_version: tuple, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        read = st.cache_data(show_spinner=show_spinner, max_entries=max_entries)(at_version)

        @functools.wraps(fn)
        def public(path: str, *args: Any, **kwargs: Any) -> Any:
            return read(path, *args, workspace_version=stamp(path), **kwargs)

        public.clear = read.clear
        return public

    return decorate


def call(fn: Callable, *args: Any, stop: bool = True, **kwargs: Any) -> Any:
    """Run ``fn``; a busy workspace stops the page with a warning and a Retry button, any other
    error shows one ``st.error`` line and stops the page (``stop=False``: returns None)."""
    try:
        return fn(*args, **kwargs)
    except WorkspaceBusy as err:
        st.warning(str(err))
        st.button("Retry", key="retry_busy", help="read the workspace again")  # a click reruns the page
        st.stop()
    except Exception as err:  # one line, the CLI's wording (workbench.errors.report)
        st.error(report(err).line)
        if stop:
            st.stop()
    return None


# -- cached reads (each opens the workspace for one call; a changed workspace is re-read) -------
@per_workspace_version(max_entries=32)
def overview(path: str) -> dict:
    """Runs (with their model), corpora, cached hooks, SAEs with metrics, analysis status."""
    from workbench.training import trained_saes

    with _open(path) as ws:
        return {
            "schema": ws.schema_version(),
            "runs": ws.runs(),
            "corpora": [{"corpus": c, "spec": spec.split("#")[0], "documents": n}
                        for c, spec, n in ws.query("SELECT corpus_id, spec, n_documents FROM corpora ORDER BY corpus_id")],
            "hooks": [dict(zip(("run", "model", "hook", "d", "contexts stored"), r)) for r in ws.cached_hooks()],
            "saes": trained_saes(ws),
            "analysed": dict(ws.query("SELECT sae_id, status FROM analyses")),
        }


def sae_names(path: str) -> list[str]:
    """Names of the finished SAEs, in id order (what ``resolve_sae`` accepts)."""
    return [s["name"] for s in overview(path)["saes"] if s["status"] == "done"]


def sae_names_or_stop(path: str, next_step: str, *, title: str | None = None) -> list[str]:
    """``sae_names``; a workspace without a finished SAE gets a note naming ``next_step`` (after ``title``,
    when the page draws its own title later) and the page stops there."""
    names = call(sae_names, path)
    if not names:
        if title:
            st.title(title)
        st.info(f"No trained SAE in this workspace yet: {next_step}.")
        st.stop()
    return names


@per_workspace_version(max_entries=256)
def resolve(path: str, ref: str):
    """``SAERecord`` by name or id; ``AnalysisError`` lists the available SAEs."""

    with _open(path) as ws:
        return resolve_sae(ws, ref)


@per_workspace_version(max_entries=512)
def feature(path: str, sae: str, feature_id: int) -> dict:
    """Everything the feature page shows: summary, top and band examples, logit effects, neighbours."""
    from workbench import features as F
    from workbench.analysis import N_BANDS, N_TOP, PER_BAND

    feature_id = int(feature_id)
    with _open(path) as ws:
        record = resolve_sae(ws, sae)
        summary = F.feature_summary(ws, record, feature_id)  # checks the id and the analysis first
        every = F.examples(ws, record, feature_id, band=None, limit=N_TOP + N_BANDS * PER_BAND)
        return {
            "sae": record,
            "summary": summary,
            "top": F.examples(ws, record, feature_id, band=-1, limit=N_TOP),
            "bands": {b: [e for e in every if e.band == b] for b in range(N_BANDS - 1, -1, -1)},
            "logits": F.logit_effects(ws, record, feature_id),
            "related": F.related_features(ws, record, feature_id),
        }


@per_workspace_version(max_entries=256)
def search(path: str, sae: str, pattern: str) -> list[dict]:
    """Features ranked by F1 of "fires" against "token matches pattern" (``search_by_pattern``)."""
    from workbench.features import search_by_pattern

    with _open(path) as ws:
        return search_by_pattern(ws, resolve_sae(ws, sae), pattern)


@per_workspace_version(max_entries=32)
def densities(path: str) -> dict[str, list[float]]:
    """Every feature's firing density per SAE name (empty for SAEs not analysed yet)."""
    from workbench.features import density_histogram

    with _open(path) as ws:
        names = [n for (n,) in ws.query("SELECT name FROM saes WHERE status = 'done' ORDER BY sae_id")]
        return {name: density_histogram(ws, resolve_sae(ws, name)) for name in names}


@per_workspace_version(max_entries=64)
def model_name(path: str, run_id: int) -> str:
    """The model a cache run used (what ``load_model`` takes)."""
    with _open(path) as ws:
        return ws.run_model(run_id)


# -- live inference (prompt inspector) --------------------------------------------------------
@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def model(name: str):
    from workbench.models import load_model

    return load_model(name)


@st.cache_resource(show_spinner=False, max_entries=8)
def sae_module(path: str, d_in: int):
    import saes

    module = saes.load_sae(path, expected_d_in=d_in)
    module.eval()
    return module


@st.cache_resource(show_spinner=False)
def _inference_lock() -> threading.Lock:
    # Hooks are attached to the shared model: two sessions running at once would see each other's.
    return threading.Lock()


@st.cache_data(show_spinner="Running the prompt…", max_entries=64)
def prompt_features(model_ref: str, sae_path: str, d_in: int, hook: str, text: str, top: int) -> dict:
    """``features_for_prompt`` with the model and SAE from the resource cache."""
    from workbench.features import features_for_prompt

    loaded, sae = model(model_ref), sae_module(sae_path, d_in)
    with _inference_lock():
        return features_for_prompt(loaded, sae, hook, text, top=top)


# -- steering ----------------------------------------------------------------------------------
# Specs travel as JSON text (hashable cache keys). Each call opens the workspace read-only for its
# own length only (SAE names, feature scales), as the reads above do; model and SAE modules come
# from the resource caches, and hooks run under the inference lock.
def check_steering(path: str, spec_json: str) -> None:
    """SAEs, feature ranges and units of a spec, before anything runs (``SteeringError`` otherwise)."""
    from workbench.steering import SteeringSpec, check_spec

    spec = SteeringSpec.from_json(spec_json)
    with _open(path) as ws:
        check_spec(spec, ws)


@per_workspace_version(max_entries=64)
def feature_scales(path: str, sae: str) -> dict:
    """Each feature's σ (``feature_max``, ``feature_p99`` lists) and where it was read (``source``)."""
    from workbench.steering import feature_scale_stats, load_steering_sae

    with _open(path) as ws:
        ref = load_steering_sae(sae, ws)
        stats = feature_scale_stats(ws, ref.sae, ref.hook)
    return {"feature_max": stats.max.tolist(), "feature_p99": stats.p99.tolist(), "source": stats.source}


@per_workspace_version(max_entries=32, show_spinner="Generating baseline and steered continuations…")
def steer_generate(path: str, model_ref: str, spec_json: str, prompt: str, max_new_tokens: int, seed: int,
                   temperature: float) -> dict:
    """``steering.generate``: the prompt's baseline and steered continuations with the same seed."""
    from workbench.steering import SteeringSpec, generate

    spec = SteeringSpec.from_json(spec_json)
    loaded = model(model_ref)
    with _inference_lock(), _open(path) as ws:
        gen = generate(loaded, prompt, spec, max_new_tokens=int(max_new_tokens), seed=int(seed),
                       temperature=float(temperature), ws=ws)
    return gen._asdict()


@per_workspace_version(max_entries=16, show_spinner="Sweeping strengths…")
def steer_sweep(path: str, model_ref: str, spec_json: str, strengths: tuple[float, ...], prompt: str, n_neutral: int) -> list[dict]:
    """``steering.sweep`` of the spec over ``strengths`` on the prompt and the first ``n_neutral`` built-in neutral texts."""
    from workbench.steering import NEUTRAL_TEXTS, SteeringSpec, sweep

    spec = SteeringSpec.from_json(spec_json)
    loaded = model(model_ref)
    with _inference_lock(), _open(path) as ws:
        rows = sweep(loaded, spec, tuple(float(s) for s in strengths), [prompt], NEUTRAL_TEXTS[:int(n_neutral)], ws=ws)
    return [{"strength": r.strength, **r.metrics} for r in rows]


# -- feature labels (workbench.explanations, when present) -------------------------------------
# The labels come from another module and table that a workspace may not have (an older workbench,
# a workspace never explained). Pages read labels only through these two adapters, which answer
# "no labels" ({} or []) whenever either is missing, so every page works with or without them.
LABELS_MODULE = "workbench.explanations"
LABELS_TABLE = "feature_explanations"


def _labels_stored(ws: Workspace) -> bool:
    """Whether ``workbench.explanations`` is importable and this workspace has its table."""
    import importlib.util

    if importlib.util.find_spec(LABELS_MODULE) is None:
        return False
    (n,) = ws.query("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [LABELS_TABLE])[0]
    return n > 0


@per_workspace_version(max_entries=64)
def labels(path: str, sae: str) -> dict[int, tuple[str, float | None, str]]:
    """feature -> (label, score, explainer) for one SAE; {} without labels."""
    with _open(path) as ws:
        if not _labels_stored(ws):
            return {}
        from workbench.explanations import feature_labels

        record = resolve_sae(ws, sae)
        return {int(f): (str(v[0]), None if v[1] is None else float(v[1]), str(v[2]))
                for f, v in feature_labels(ws, record.sae_id).items()}


@per_workspace_version(max_entries=256)
def label_search(path: str, sae: str, text: str, limit: int = 20) -> list[tuple[int, str, float | None]]:
    """(feature, label, score) whose label matches ``text``, best first; [] without labels."""
    with _open(path) as ws:
        if not _labels_stored(ws):
            return []
        from workbench.explanations import search_labels

        record = resolve_sae(ws, sae)
        return [(int(f), str(label), None if score is None else float(score))
                for f, label, score in search_labels(ws, record.sae_id, text, int(limit))]


def label_map(path: str, sae: str) -> dict[int, tuple[str, float | None, str]]:
    """``labels`` for a page: a failure to read them is one error line, and the page goes on without them."""
    return call(labels, path, sae, stop=False) or {}


def feature_name(feature: int, labels_: dict, *, word: str = "feature") -> str:
    """``feature 12 · its label`` (just ``feature 12`` without a label): how every page names a feature."""
    entry = labels_.get(int(feature))
    return f"{word} {feature} · {entry[0]}" if entry else f"{word} {feature}"


# -- the Features page --------------------------------------------------------------------------
MAP_LIMIT = 4096  # decoder directions laid out on the map at most (a seeded sample beyond)

FEATURE_TABLE_SQL = """
WITH fired AS (
    SELECT a.feature, d.domain, count(*) AS n
    FROM feature_acts a
    JOIN tokens t ON t.context_id = a.context_id AND t.position = a.position
    JOIN contexts c ON c.context_id = a.context_id
    JOIN runs r ON r.run_id = c.run_id
    JOIN documents d ON d.corpus_id = r.corpus_id AND d.doc_id = t.doc_id
    WHERE a.sae_id = $sae
    GROUP BY a.feature, d.domain
), top AS (
    SELECT feature, domain, n / sum(n) OVER (PARTITION BY feature) AS share,
           row_number() OVER (PARTITION BY feature ORDER BY n DESC, domain) AS rk
    FROM fired
)
SELECT s.feature, s.density, s.n_fired, s.mean_value, s.max_value, top.domain, top.share
FROM feature_stats s LEFT JOIN top ON top.feature = s.feature AND top.rk = 1
WHERE s.sae_id = $sae
ORDER BY s.feature
"""


@per_workspace_version(max_entries=16, show_spinner="Reading every feature…")
def feature_table(path: str, sae: str) -> dict[str, list]:
    """Every feature of an analysed SAE, one query: id, density, firings, mean and max activation, and the
    dominant domain (the corpus domain of the documents where most of its firings fall) with its share."""
    from workbench.features import check_feature

    with _open(path) as ws:
        record = resolve_sae(ws, sae)
        check_feature(ws, record, 0)  # analysed? (one line naming the command otherwise)
        rows = ws.query(FEATURE_TABLE_SQL, {"sae": record.sae_id})
    keys = ("feature", "density", "n_fired", "mean", "max", "domain", "domain_share")
    return {k: [r[i] for r in rows] for i, k in enumerate(keys)}


def _layout(directions, seed: int = 0):
    """2-D coordinates of unit vectors: UMAP (cosine) when installed, else t-SNE (cosine) after PCA to 50 dims."""
    import importlib.util

    import numpy as np

    n = len(directions)
    if n < 4:  # too few points for a neighbour embedding: a line
        return np.stack([np.arange(n, dtype=float), np.zeros(n)], axis=1), "index"
    if importlib.util.find_spec("umap") is not None:
        import umap

        return umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(directions), "UMAP"
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = directions
    if x.shape[1] > 50 and n > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", max_iter=500, random_state=seed)
    with threadpool_limits(1):  # OpenMP threads on a busy machine slow it down many times over (15 s → 0.5 s on 128)
        return tsne.fit_transform(x), "t-SNE"


@per_workspace_version(max_entries=8, show_spinner="Laying out the decoder directions…")
def feature_map(path: str, sae: str, limit: int = MAP_LIMIT) -> dict:
    """The SAE's unit decoder directions in 2-D, once per SAE and workspace version: ``features`` (ids laid
    out, a seeded sample of ``limit`` when wider), ``x``, ``y``, ``width`` and ``method``."""
    import numpy as np

    import saes
    from workbench.analysis import decoder_directions

    with _open(path) as ws:
        record = resolve_sae(ws, sae)
    module = saes.load_sae(record.path, expected_d_in=record.d_in)
    directions = decoder_directions(module).cpu().numpy().astype(np.float64)
    width = len(directions)
    ids = np.arange(width) if width <= limit else np.sort(np.random.default_rng(0).choice(width, int(limit), replace=False))
    xy, method = _layout(directions[ids])
    return {"features": ids.tolist(), "x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(), "width": width, "method": method}


@per_workspace_version(max_entries=256)
def previews(path: str, sae: str, features: tuple[int, ...]) -> dict[int, object]:
    """Each feature's strongest example (a short window) for one-line previews in search results."""
    from workbench.features import examples

    with _open(path) as ws:
        record = resolve_sae(ws, sae)
        out = {}
        for f in features:
            top = examples(ws, record, int(f), band=-1, before=8, after=4, limit=1)
            if top:
                out[int(f)] = top[0]
        return out
