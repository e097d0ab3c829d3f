"""Export an analysed SAE's feature pages as the JSON that SAEDashboard's Neuronpedia runner writes.

``workbench export --sae S --features [RANGE] --format neuronpedia --out DIR`` writes::

    DIR/batch-0.json, batch-1.json, ...   {model_id, layer, sae_set, sae_id_suffix, features: [...]}
    DIR/skipped_indexes.json              the selected features that never fired (dead), left out of the batches
    DIR/explanations.json                 the exported features' labels (`workbench explain`), one row per explainer
    DIR/run_settings.json                 what was exported, from which workspace, by which workbench version

Each entry of ``features`` has the keys of SAEDashboard's ``NeuronpediaDashboardFeature`` (no
others, so SAEDashboard's own loader and its Neuronpedia bulk-import converter accept the files),
filled from the workspace's feature store: the top examples and the quantile-band examples as
``activations`` (whole contexts, BOS left out, with the feature's value on every token), the
density histogram, the promoted and suppressed tokens, and the decoder-nearest features. What
the workspace does not compute (neuron alignment, activation-correlated neurons, the histogram of
logit effects over the whole vocabulary, decoder weight distribution over heads) stays an empty
list.

SAEDashboard's feature dict has no field for explanations, so labels go to their own file, one row
per (feature, explainer) in the fields of Neuronpedia's explanation export: ``modelId``, ``layer``
(Neuronpedia's source id, ``LAYER-SAE_SET``), ``index`` (a string), ``description`` (the label),
``typeName`` (``workbench-pattern|hf|openai``), ``explanationModelName`` (``pattern``, or the name of
the model the label came from, never its endpoint or local path), ``scoreV1`` (the headline score: held-out F1 for ``pattern``, the mean of
the detection and fuzzing scores for a judged LLM label; null when unscored), plus ``scores`` with every score stored.

``--format saedashboard`` names the same files: SAEDashboard's Neuronpedia runner output is the
data SAEDashboard produces for viewers outside its own HTML pages, so the two names are aliases.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from workbench.analysis import HIST_BINS, N_BANDS
from workbench.errors import WorkbenchError
from workbench.export import workbench_version
from workbench.safety import check_writable_dir
from workbench.workspace import SAERecord, Workspace, fetch_one, resolve_sae

__all__ = ["FORMATS", "FeatureExportError", "FeatureExportSummary", "export_features", "parse_feature_range"]

FORMATS = ("neuronpedia", "saedashboard")  # aliases: see the module docstring
ROUND = 5  # decimals kept on every float, as SAEDashboard's converter does


class FeatureExportError(WorkbenchError):
    """A feature export asked for something the workspace cannot give."""


@dataclass(frozen=True)
class FeatureExportSummary:
    out: Path
    sae: str
    format: str
    n_features: int  # written into batch files
    n_skipped: int  # selected but dead
    n_batches: int


_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def parse_feature_range(text: str | None) -> list[tuple[int, int]] | None:
    """``None``/``"all"`` → every feature; ``"N"``, ``"A-B"`` (inclusive) or a comma list of those → ranges."""
    if text is None or text.strip().lower() == "all":
        return None
    ranges = []
    for part in text.split(","):
        match = _RANGE.fullmatch(part)
        if not match:
            raise FeatureExportError(f"invalid --features {text!r}: use all, N, A-B (inclusive) or a comma list such as 0-99,200")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise FeatureExportError(f"invalid --features {text!r}: range {first}-{last} ends before it starts")
        ranges.append((first, last))
    return ranges


def _selected_features(sae: SAERecord, ranges: list[tuple[int, int]] | None) -> list[int]:
    if ranges is None:
        return list(range(sae.width))
    for first, last in ranges:
        if last >= sae.width:
            raise FeatureExportError(f"--features {first}-{last} is out of range for SAE '{sae.name}': valid ids are 0..{sae.width - 1}")
    return sorted({f for first, last in ranges for f in range(first, last + 1)})


def _layer(hook: str) -> int:
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else 0


def export_features(ws: Workspace, sae_ref: str | int, out_dir: str | Path, *, fmt: str = "neuronpedia",
                    features: list[tuple[int, int]] | None = None, batch_size: int = 128) -> FeatureExportSummary:
    """Write the feature data of SAE ``sae_ref`` (every feature, or those in ``features``) as batch files.

    Every input is checked before anything is written: a bad one raises ``WorkbenchError`` and leaves
    ``out_dir`` uncreated.
    """
    if fmt not in FORMATS:
        raise FeatureExportError(f"unknown --format {fmt!r}; valid: {', '.join(FORMATS)} (the same SAEDashboard batch files)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise FeatureExportError(f"--batch-size must be a positive number of features per file, got {batch_size!r}")
    sae = resolve_sae(ws, sae_ref)
    status = fetch_one(ws.con, "SELECT status, n_contexts FROM analyses WHERE sae_id = ?", [sae.sae_id])
    if not status or status[0] != "done":
        raise FeatureExportError(f"SAE '{sae.name}' is not analysed yet, so it has no feature data: "
                                 f"run `workbench analyze --db {ws.path} --sae {sae.name}` first")
    selected = _selected_features(sae, features)
    out = check_writable_dir(out_dir, "export folder").resolve()

    model = ws.run_model(sae.run_id)
    ctx_len, corpus = fetch_one(
        ws.con, "SELECT r.ctx_len, c.spec FROM runs r JOIN corpora c USING (corpus_id) WHERE r.run_id = ?", [sae.run_id]
    )
    header = {"model_id": model, "layer": _layer(sae.hook), "sae_set": sae.name, "sae_id_suffix": None}
    common = {"n_prompts_total": int(status[1]), "n_tokens_in_prompt": int(ctx_len), "dataset": corpus.split("#")[0]}
    fired = dict(ws.query(
        "SELECT feature, n_fired FROM feature_stats WHERE sae_id = ? AND feature IN (SELECT unnest(?::INTEGER[]))",
        [sae.sae_id, selected],
    ))
    live = [f for f in selected if fired.get(f, 0) > 0]
    dead = [f for f in selected if fired.get(f, 0) == 0]
    for stale in out.glob("batch-*.json"):  # a smaller re-export must not leave old batches behind
        stale.unlink()
    batches = [live[i : i + batch_size] for i in range(0, len(live), batch_size)]
    for index, batch in enumerate(batches):
        document = dict(header, features=[{**f, **common, "vector": []} for f in _feature_dicts(ws, sae, model, batch)])
        (out / f"batch-{index}.json").write_text(json.dumps(document))
    skipped = {"model_id": model, "layer": str(header["layer"]), "sae_set": sae.name, "log_sparsity": None, "skipped_indexes": dead}
    (out / "skipped_indexes.json").write_text(json.dumps(skipped))
    labels = _explanations(ws, sae, model, f"{header['layer']}-{sae.name}", live)
    (out / "explanations.json").write_text(json.dumps(labels))
    settings = {"workbench_version": workbench_version(), "workspace": ws.path.name, "sae": sae.name, "sae_id": sae.sae_id,
                "hook": sae.hook, "width": sae.width, "format": fmt, "features": _ranges(selected),
                "n_features": len(live), "n_skipped": len(dead), "n_features_per_batch": batch_size, "n_batches": len(batches),
                "n_explanations": len(labels)}
    (out / "run_settings.json").write_text(json.dumps(settings, indent=2))
    return FeatureExportSummary(out, sae.name, fmt, len(live), len(dead), len(batches))


def _explanations(ws: Workspace, sae: SAERecord, model: str, source: str, features: list[int]) -> list[dict]:
    """The stored labels of ``features`` as rows of Neuronpedia's explanation export (see the module docstring)."""
    rows = ws.query(
        """SELECT feature, explainer, label, scores FROM feature_explanations
           WHERE sae_id = ? AND feature IN (SELECT unnest(?::INTEGER[])) ORDER BY feature, explainer""",
        [sae.sae_id, features],
    )
    out = []
    for feature, explainer, label, scores in rows:
        scores = json.loads(scores) if scores else {}
        out.append({"modelId": model, "layer": source, "index": str(feature), "description": label,
                    "typeName": f"workbench-{explainer.split(':', 1)[0]}", "explanationModelName": _model_name(explainer),
                    "scoreV1": scores.get("headline"), "scores": scores})
    return out


def _model_name(explainer: str) -> str:
    """The name of the model behind a stored explainer, never its endpoint or path: ``pattern``; ``hf:REPO``
    or ``hf:/a/folder`` → REPO or ``folder``; ``openai:URL#MODEL`` → MODEL (``openai`` without one)."""
    kind, _, rest = explainer.partition(":")
    if kind == "hf":
        return Path(rest).name if "/" in rest and Path(rest).is_absolute() else rest
    if kind == "openai":
        return rest.rpartition("#")[2] if "#" in rest else "openai"
    return explainer


def _ranges(ids: list[int]) -> list[list[int]]:
    """Sorted ids as inclusive [first, last] runs."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


def _round(values) -> list[float]:
    return [round(float(v), ROUND) for v in values]


def _feature_dicts(ws: Workspace, sae: SAERecord, model: str, batch: list[int]) -> list[dict]:
    """The NeuronpediaDashboardFeature dicts of ``batch`` (live features), in order; four queries per batch."""
    params = [sae.sae_id, batch]
    in_batch = "sae_id = ? AND feature IN (SELECT unnest(?::INTEGER[]))"
    stats = {f: (d, m, list(h or [])) for f, d, m, h in ws.query(
        f"SELECT feature, density, max_value, hist_counts FROM feature_stats WHERE {in_batch}", params)}
    logits: dict[int, list[tuple[int, int, float]]] = {}
    for f, rank, token, effect in ws.query(f"SELECT feature, rank, token_id, effect FROM feature_logits WHERE {in_batch}", params):
        logits.setdefault(f, []).append((rank, token, effect))
    related: dict[int, list[tuple[int, float, float]]] = {}
    for f, other, cosine, jaccard in ws.query(
        f"SELECT feature, other, cosine, cooccurrence FROM feature_related WHERE {in_batch} ORDER BY feature, cosine DESC, other", params
    ):
        related.setdefault(f, []).append((other, cosine, jaccard))
    examples: dict[int, list[tuple[int, int, int, float]]] = {}
    for f, band, cid, pos, value in ws.query(
        f"""SELECT feature, band, context_id, position, value FROM feature_examples WHERE {in_batch}
            ORDER BY feature, band = -1 DESC, band DESC, value DESC, rank""", params
    ):
        examples.setdefault(f, []).append((band, cid, pos, value))
    contexts = sorted({e[1] for rows in examples.values() for e in rows})
    tokens: dict[int, list[int]] = {}
    for cid, _, token in ws.query(
        "SELECT context_id, position, token_id FROM tokens WHERE context_id IN (SELECT unnest(?::BIGINT[])) ORDER BY context_id, position",
        [contexts],
    ):
        tokens.setdefault(cid, []).append(token)
    acts = {(f, cid, pos): v for f, cid, pos, v in ws.query(
        f"""SELECT feature, context_id, position, value FROM feature_acts
            WHERE {in_batch} AND context_id IN (SELECT unnest(?::BIGINT[]))""", params + [contexts])}
    wanted = sorted({t for row in tokens.values() for t in row} | {t for rows in logits.values() for _, t, _ in rows})
    strings = dict(ws.query("SELECT token_id, token FROM vocab WHERE tokenizer = ? AND token_id IN (SELECT unnest(?::INTEGER[]))",
                            [model, wanted]))

    def text(token: int) -> str:
        return strings.get(token, f"<{token}>")

    out = []
    for f in batch:
        density, peak, hist = stats[f]
        peak = float(peak or 0.0)
        total = sum(hist)
        promoted = sorted((r for r in logits.get(f, []) if r[0] > 0), key=lambda r: -r[2])
        suppressed = sorted((r for r in logits.get(f, []) if r[0] < 0), key=lambda r: r[2])
        activations = []
        for band, cid, pos, value in examples.get(f, []):
            row = tokens[cid]
            if band < 0:
                bin_min, bin_max, contains = -1, round(peak, ROUND), -1
            else:
                bin_min, bin_max = round(peak * band / N_BANDS, ROUND), round(peak * (band + 1) / N_BANDS, ROUND)
                contains = round(_band_share(hist, band) / total, ROUND) if total else 0.0
            activations.append({
                "bin_min": bin_min, "bin_max": bin_max, "bin_contains": contains,
                "tokens": [text(t) for t in row[1:]],  # BOS left out, as SAEDashboard does
                "values": _round(acts.get((f, cid, p), 0.0) for p in range(1, len(row))),
                "qualifying_token_index": pos - 1,
            })
        near = related.get(f, [])
        out.append({
            "feature_index": f,
            "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
            "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
            "correlated_features_indices": [o for o, _, _ in near],
            "correlated_features_l1": _round(c for _, c, _ in near),  # decoder cosine (SAEDashboard puts its cosine here too)
            "correlated_features_pearson": _round(j for _, _, j in near),  # co-occurrence Jaccard: see the docs
            "neg_str": [text(t) for _, t, _ in suppressed], "neg_values": _round(e for _, _, e in suppressed),
            "pos_str": [text(t) for _, t, _ in promoted], "pos_values": _round(e for _, _, e in promoted),
            "frac_nonzero": float(density),
            "freq_hist_data_bar_values": _round(peak * (i + 0.5) / HIST_BINS for i in range(len(hist))),
            "freq_hist_data_bar_heights": [int(h) for h in hist],
            "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
            "decoder_weights_dist": [],
            "activations": activations,
        })
    return out


def _band_share(hist: list[int], band: int) -> int:
    """Firings in quantile band ``band``: the histogram bins whose centre lies in it (exact when the band
    edges fall on bin edges, as with 30 bins and 10 bands)."""
    n = len(hist)
    return sum(h for i, h in enumerate(hist) if min(N_BANDS - 1, int((i + 0.5) / n * N_BANDS)) == band)
