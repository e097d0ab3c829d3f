"""Fill the sparse feature store and the per-feature statistics the browser reads.

For an SAE (or codebook) trained on a cached hook, every cached token at positions ≥ 1 is
encoded in the dictionary's batch-independent inference form, z = encode(x), and every nonzero
z_f is stored as a row (sae, context, position, feature, value). Rows are written in context
order, one transaction per batch of contexts together with the progress counter, so a killed
``workbench analyze`` resumes after the last committed batch.

Then, from those rows (one transaction, recomputed whole on every finish):
- density_f = #{tokens with z_f > 0} / #tokens, mean and max of z_f where it fires, and a
  ``HIST_BINS``-bin histogram of z_f over (0, max_f];
- top examples (the ``N_TOP`` largest z_f) and quantile examples: (0, max_f] cut into
  ``N_BANDS`` equal bands, up to ``PER_BAND`` tokens per band, chosen by a fixed hash so
  reruns pick the same ones; no two examples of a feature (top and bands together) show the
  same window text (the token ids ``WINDOW_BEFORE`` before to ``WINDOW_AFTER`` after the token,
  the window a feature page shows): a repeat is skipped for the next token in the list's order;
- logit effects: the unit decoder direction d_f scaled by the final norm's weight γ and read by
  the unembedding, (d_f ⊙ γ) W_U — the ``N_LOGITS`` most promoted and most suppressed tokens
  (the norm's input-dependent scale is left out, as usual for direct logit effects);
- related features: the ``N_RELATED`` nearest decoder directions by cosine, with their
  co-occurrence Jaccard |A_f ∩ A_g| / |A_f ∪ A_g| over the analysed tokens.

Last, an SAE whose weights live in the workspace's folder (``DB.saes/``) gets sae-lens's
``sparsity.safetensors`` beside them: log10(density_f + 1e-10) (``write_sparsity``).

Everything with the SAE runs on one device (``device``; default: the model's, else CUDA when
present). A batch is encoded ``ENCODE_ELEMENTS`` dense latents at a time, compacted on the device
to each token's nonzeros (values, columns) [rows, m], and comes to the host in one packed
transfer per batch; no dense [tokens, width] array reaches the host. Co-occurrence counts come
from sorted keys t·width + f and ``searchsorted``, in memory linear in the stored nonzeros.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

import saes
from workbench.activations import context_ids, read_contexts
from workbench.errors import WorkbenchError
from workbench.safety import UnsafeInputError, confined
from workbench.storage import insert_arrow
from workbench.training import run_device
from workbench.workspace import SAERecord, Workspace, fetch_one, resolve_sae

HIST_BINS, N_TOP, N_BANDS, PER_BAND, N_LOGITS, N_RELATED = 30, 20, 10, 5, 10, 5
# The window a feature page shows around an example's token (the default of features.examples); a feature's
# examples are distinct by the token ids of this window.
WINDOW_BEFORE, WINDOW_AFTER = 12, 6
_OVERSAMPLE = 4  # example candidates fetched per kept example; more are fetched for a feature that runs short
ENCODE_ELEMENTS = 1 << 25  # dense latents per encode chunk: ~6 [rows, width] temporaries of ≤ 128 MiB, < 1 GiB on the device
COOC_TOKENS = 65_536  # tokens whose stored nonzeros are fetched per co-occurrence step
COOC_LOOKUPS = 1 << 22  # (nonzero, related feature) lookups per step: ~25 bytes each, ~100 MiB on the device


class AnalysisError(WorkbenchError):
    """An SAE or feature the workspace does not have."""


def decoder_directions(sae: torch.nn.Module) -> torch.Tensor:
    """Unit-norm dictionary directions in the model's space: [width, d]."""
    weights = sae.W_dec if hasattr(sae, "W_dec") else sae.codebook
    return torch.nn.functional.normalize(weights.detach().float(), dim=1)


@dataclass(frozen=True)
class AnalysisSummary:
    sae_id: int
    n_tokens: int
    n_nonzeros: int
    resumed_from: int
    live_features: int


def sparse_codes(sae: torch.nn.Module, x: torch.Tensor, m: int) -> torch.Tensor:
    """Each row's nonzero latents z = encode(x), packed for one transfer; no value is read (runs on ``meta``).

    x [n, d] on the SAE's device. Returns int32 [1 + 2·n·m] on that device: the largest nonzero
    count of a row, then values [n, m] (float32 bits) and columns [n, m]. A row's nonzeros come
    first, in ascending column order (the order of ``z.nonzero()``), then zeros; a row with more
    than m nonzeros is cut, which the count shows. Dense memory: ENCODE_ELEMENTS latents at a time.
    """
    width = sae.cfg.width
    rows = max(1, ENCODE_ELEMENTS // width)
    weight = torch.arange(width, 0, -1, dtype=torch.int32, device=x.device)  # [width]: larger for lower columns
    bound = torch.zeros(1, dtype=torch.int32, device=x.device)
    values, columns = [], []
    for start in range(0, x.shape[0], rows):
        z = sae.encode(x[start : start + rows])  # [r, width]
        fired = z != 0  # NaN counts as fired, as in nonzero()
        bound = torch.maximum(bound, fired.sum(1, dtype=torch.int32).amax().reshape(1))
        cols = (fired * weight).topk(m, dim=1).indices  # [r, m]: distinct keys where fired, 0 elsewhere
        values.append(z.gather(1, cols).float().view(torch.int32).reshape(-1))  # [r·m]
        columns.append(cols.int().reshape(-1))  # [r·m]
    return torch.cat([bound, *values, *columns])


def encode_nonzeros(sae: torch.nn.Module, x: torch.Tensor, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(row, column, value) of every nonzero of encode(x), in ``z.nonzero()`` order, as host arrays,
    and the slot count m to use next. One host transfer per call, plus one per growth of m (a
    row had more than m nonzeros: m at least doubles and the batch is encoded again)."""
    n = x.shape[0]
    while True:
        with torch.no_grad():
            packed = sparse_codes(sae, x, m).cpu().numpy()  # the one host read
        if packed[0] <= m:
            break
        m = min(sae.cfg.width, max(2 * m, int(packed[0])))
    values = packed[1 : 1 + n * m].view(np.float32).reshape(n, m)
    columns = packed[1 + n * m :].reshape(n, m)
    row, slot = np.nonzero(values != 0)  # row-major: by row, then column ascending
    return row, columns[row, slot], values[row, slot], m


def analyze(ws: Workspace, sae_ref: str | int, *, model=None, batch_contexts: int = 64, progress: bool = True,
            device: str | torch.device | None = None) -> AnalysisSummary:
    """Encode every cached token of the SAE's hook and store nonzeros and statistics (resumable).

    ``model`` (the run's ``LoadedModel``) is needed for logit effects; without it they are skipped.
    ``device``: where the SAE encodes (None: the model's device, else CUDA when present).
    """
    if isinstance(batch_contexts, bool) or not isinstance(batch_contexts, int) or batch_contexts <= 0:
        raise AnalysisError(f"contexts per batch must be a positive integer, got {batch_contexts!r}")
    device = run_device(device, model)
    record = resolve_sae(ws, sae_ref)
    sae = saes.load_sae(record.path, expected_d_in=record.d_in).to(device)
    sae.eval()
    slots = max(1, min(record.width, sae.cfg.k))  # nonzero slots per token: grows when a token has more
    ids = context_ids(ws, record.hook, run_id=record.run_id, split="all")
    if not ids:
        raise AnalysisError(f"hook '{record.hook}' of run {record.run_id} has no cached contexts")
    ctx_len = int(fetch_one(ws.con, "SELECT ctx_len FROM runs WHERE run_id = ?", [record.run_id])[0])
    with ws.transaction() as con:
        row = fetch_one(con, "SELECT contexts_done, n_contexts FROM analyses WHERE sae_id = ?", [record.sae_id])
        if row is None or row[1] != len(ids):  # new, or the cache grew since: start over
            con.execute("DELETE FROM feature_acts WHERE sae_id = ?", [record.sae_id])
            con.execute("DELETE FROM analyses WHERE sae_id = ?", [record.sae_id])
            con.execute("INSERT INTO analyses (sae_id, n_contexts, contexts_done, n_tokens, status) VALUES (?, ?, 0, ?, 'running')",
                        [record.sae_id, len(ids), len(ids) * (ctx_len - 1)])
            done = 0
        else:
            done = int(row[0])
            con.execute("UPDATE analyses SET status = 'running', error = NULL WHERE sae_id = ?", [record.sae_id])

    bar = tqdm(total=len(ids) * (ctx_len - 1), initial=done * (ctx_len - 1), unit="tok", unit_scale=True,
               desc=f"analysing sae {record.sae_id}", disable=not progress, dynamic_ncols=True)
    with ws.job("analyses", record.sae_id), bar:  # a failure is recorded on the row; a rerun resumes
        for start in range(done, len(ids), batch_contexts):
            chunk = ids[start : start + batch_contexts]
            acts = read_contexts(ws, record.hook, chunk, run_id=record.run_id)[:, 1:]  # [n, L-1, d], BOS left out
            x = acts.reshape(-1, acts.shape[-1]).to(device, non_blocking=True)  # [n·(L-1), d]
            token, feature, value, slots = encode_nonzeros(sae, x, slots)  # host arrays [nonzeros] each
            rows = pa.table({
                "sae_id": np.full(token.size, record.sae_id, np.int32),
                "context_id": np.asarray(chunk, np.int64)[token // (ctx_len - 1)],
                "position": (token % (ctx_len - 1) + 1).astype(np.int16),
                "feature": feature.astype(np.int32),
                "value": value.astype(np.float32),
            })
            with ws.transaction() as con:
                insert_arrow(con, "feature_acts", rows)
                con.execute("UPDATE analyses SET contexts_done = ? WHERE sae_id = ?", [start + len(chunk), record.sae_id])
            bar.update(len(chunk) * (ctx_len - 1))

        n_tokens = len(ids) * (ctx_len - 1)
        directions = decoder_directions(sae)  # [width, d]
        with ws.transaction() as con:
            _store_statistics(con, record, n_tokens)
            _store_related(con, record, directions, ids, ctx_len)
            if model is not None:
                _store_logit_effects(con, record, directions, model)
            con.execute("UPDATE analyses SET status = 'done' WHERE sae_id = ?", [record.sae_id])
    write_sparsity(ws, record)
    n_nonzeros, live = fetch_one(
        ws.con, "SELECT sum(n_fired), count(*) FILTER (WHERE n_fired > 0) FROM feature_stats WHERE sae_id = ?", [record.sae_id]
    )
    return AnalysisSummary(record.sae_id, n_tokens, int(n_nonzeros or 0), done, int(live))


def write_sparsity(ws: Workspace, record: SAERecord) -> Path | None:
    """sae-lens's ``sparsity.safetensors`` beside the weights: log10(density_f + 1e-10) per latent from
    ``feature_stats`` (saes.io.sparsity_from_density). Only for SAEs in the workspace's weights folder
    (``DB.saes/``): a folder registered with ``eval --sae PATH`` is the user's and is not written to.
    Returns the file, or None when nothing was written; a failed write warns, the analysis stands."""
    try:
        folder = confined(ws.weights_dir, record.path)
    except UnsafeInputError:
        return None
    density = [d for (d,) in ws.query("SELECT density FROM feature_stats WHERE sae_id = ? ORDER BY feature", [record.sae_id])]
    if len(density) != record.width:
        return None
    try:
        return saes.io.save_sparsity(folder, saes.io.sparsity_from_density(density))
    except (OSError, saes.SAEError) as err:
        warnings.warn(f"sparsity.safetensors not written for SAE {record.name}: {err}", stacklevel=2)
        return None


def _store_statistics(con, record: SAERecord, n_tokens: int) -> None:
    sae_id = record.sae_id
    for table in ("feature_stats", "feature_examples"):
        con.execute(f"DELETE FROM {table} WHERE sae_id = ?", [sae_id])
    aggregates = con.execute(
        "SELECT feature, count(*), max(value) FROM feature_acts WHERE sae_id = ? GROUP BY feature", [sae_id]
    ).fetchall()
    n_fired = np.zeros(record.width, np.int64)
    peak = np.full(record.width, np.nan)
    for feature, count, mx in aggregates:
        n_fired[feature], peak[feature] = count, mx
    mean = _exact_means(con, sae_id, record.width)
    hist = np.zeros((record.width, HIST_BINS), np.int64)
    for feature, b, count in con.execute(
        f"""SELECT a.feature, least({HIST_BINS - 1}, floor(a.value / m.mx * {HIST_BINS}))::INTEGER, count(*)
            FROM feature_acts a JOIN (SELECT feature, max(value) mx FROM feature_acts WHERE sae_id = ? GROUP BY feature) m
            USING (feature) WHERE a.sae_id = ? GROUP BY ALL""",
        [sae_id, sae_id],
    ).fetchall():
        hist[feature, b] = count
    insert_arrow(con, "feature_stats", pa.table({
        "sae_id": np.full(record.width, sae_id, np.int32),
        "feature": np.arange(record.width, dtype=np.int32),
        "n_fired": n_fired,
        "density": n_fired / max(1, n_tokens),
        "mean_value": pa.array(mean, from_pandas=True),
        "max_value": pa.array(peak, from_pandas=True),
        "hist_counts": pa.array(list(hist)),
    }))
    _store_examples(con, sae_id)


def _store_examples(con, sae_id: int) -> None:
    """Top and band examples of every feature, no two of one feature with the same window text.

    Candidates come from SQL in each list's own total order (``_example_candidates``), ``factor``
    times as many as are kept; ``_distinct_examples`` keeps the first ones whose window is new for
    the feature. A feature whose candidates ran out before its lists were full (and could have more)
    is fetched again with four times the factor; the picks depend only on the orders, not on the
    factor, so this is the selection one unlimited pass would make.
    """
    picked: dict[str, list[np.ndarray]] = {key: [] for key in ("feature", "band", "rank", "context_id", "position", "value")}
    features, factor = None, _OVERSAMPLE
    while True:
        top, banded = _example_candidates(con, sae_id, features, factor)
        chosen, short = _distinct_examples(con, top, banded, factor)
        for key in picked:
            picked[key].append(chosen[key])
        if short.size == 0:
            break
        features, factor = short, factor * 4
    columns = {key: np.concatenate(parts) for key, parts in picked.items()}
    order = np.lexsort((columns["rank"], -columns["band"], columns["feature"]))  # feature, band (top first), rank
    insert_arrow(con, "feature_examples", pa.table({
        "sae_id": np.full(order.size, sae_id, np.int32),
        "feature": columns["feature"][order].astype(np.int32),
        "band": columns["band"][order].astype(np.int16),
        "rank": columns["rank"][order].astype(np.int16),
        "context_id": columns["context_id"][order].astype(np.int64),
        "position": columns["position"][order].astype(np.int16),
        "value": columns["value"][order].astype(np.float32),
    }))


def _example_candidates(con, sae_id: int, features: np.ndarray | None, factor: int) -> tuple[dict, dict]:
    """Top candidates (N_TOP·factor per feature) and band candidates (PER_BAND·factor per feature and band).

    Each comes as numpy columns (feature, band, i, context_id, position, value) sorted by feature
    (then band) and i, the 1-based place in the list's order. ``features``: only these (None: all).

    Top-n aggregates keep n rows per group in memory, unlike a window sort over every nonzero. Their
    keys are structs compared field by field, unique per row (a token fires a feature once), so the
    order is total: top candidates by (value desc, context_id asc, position asc), the same order as
    row_number() OVER (PARTITION BY feature ORDER BY value DESC, context_id, position); band candidates
    by (hash, context_id, position), the hash only spreading the picks over the band. float16
    activations give many exactly equal values, and with a non-unique key the picks and their
    ranks depended on how DuckDB's threads happened to split the scan.
    """
    only = "" if features is None else "AND a.feature IN (SELECT unnest(?::INTEGER[]))"
    extra = [] if features is None else [features.tolist()]
    top = con.execute(
        f"""WITH g AS (
                SELECT a.feature, -1 AS band, max_by({{'c': a.context_id, 'p': a.position, 'v': a.value}},
                                                 {{'v': a.value, 'c': -a.context_id, 'p': -a.position}}, {N_TOP * factor}) AS picks
                FROM feature_acts a WHERE a.sae_id = ? {only} GROUP BY a.feature),
            u AS (SELECT feature, band, generate_subscripts(picks, 1) AS i, unnest(picks) AS e FROM g)
            SELECT feature, band, i, e.c AS context_id, e.p AS position, e.v AS value FROM u ORDER BY feature, i""",
        [sae_id, *extra],
    ).fetchnumpy()
    banded = con.execute(
        f"""WITH g AS (
                SELECT a.feature, least({N_BANDS - 1}, floor(a.value / s.max_value * {N_BANDS}))::SMALLINT AS band,
                       min_by({{'c': a.context_id, 'p': a.position, 'v': a.value}},
                              {{'h': hash(a.context_id, a.position), 'c': a.context_id, 'p': a.position}}, {PER_BAND * factor}) AS picks
                FROM feature_acts a JOIN feature_stats s ON s.sae_id = a.sae_id AND s.feature = a.feature
                WHERE a.sae_id = ? {only} GROUP BY ALL),
            u AS (SELECT feature, band, generate_subscripts(picks, 1) AS i, unnest(picks) AS e FROM g)
            SELECT feature, band, i, e.c AS context_id, e.p AS position, e.v AS value FROM u ORDER BY feature, band, i""",
        [sae_id, *extra],
    ).fetchnumpy()
    return top, banded


def _window_keys(con, context_id: np.ndarray, position: np.ndarray) -> np.ndarray:
    """An id per (context, position), equal exactly when the token ids of the window a feature page
    shows around it (``WINDOW_BEFORE`` tokens before, ``WINDOW_AFTER`` after, cut at the context's
    ends) are equal: int64 [n]."""
    if context_id.size == 0:
        return np.zeros(0, np.int64)
    contexts = np.unique(context_id)
    rows = con.execute(
        "SELECT context_id, position, token_id FROM tokens WHERE context_id IN (SELECT unnest(?::BIGINT[]))",
        [contexts.tolist()],
    ).fetchnumpy()
    length = int(rows["position"].max()) + 1
    table = np.full((contexts.size, length + 1), -1, np.int32)  # token ids; one column of -1 past the end
    table[np.searchsorted(contexts, rows["context_id"]), rows["position"].astype(np.int64)] = rows["token_id"]
    ends = (table[:, :length] >= 0).sum(1)  # tokens per context
    tokens, token_of = np.unique(np.searchsorted(contexts, context_id) * (length + 1) + position, return_inverse=True)
    row, pos = tokens // (length + 1), tokens % (length + 1)  # each distinct (context, position) once
    start = np.maximum(0, pos - WINDOW_BEFORE)
    stop = np.minimum(ends[row], pos + WINDOW_AFTER + 1)
    offsets = np.arange(WINDOW_BEFORE + WINDOW_AFTER + 1)
    index = start[:, None] + offsets  # [n, window], the window left-aligned
    windows = np.where(index < stop[:, None], table[row[:, None], np.minimum(index, length)], -1)
    rows_as_bytes = np.ascontiguousarray(windows).view(np.dtype((np.void, windows.dtype.itemsize * windows.shape[1])))
    _, keys = np.unique(rows_as_bytes.reshape(-1), return_inverse=True)  # equal bytes exactly when equal token ids
    return keys.reshape(-1).astype(np.int64)[token_of.reshape(-1)]


def _first_distinct(group: np.ndarray, key: np.ndarray, used: np.ndarray, n_keys: int, keep: int) -> np.ndarray:
    """Rows to keep, in order: per group (sorted, contiguous), the first ``keep`` rows whose key is
    neither in ``used`` (codes group·n_keys + key) nor on an earlier row of the group. Bool [n]."""
    code = group * n_keys + key
    fresh = ~np.isin(code, used)
    first = np.zeros(code.size, bool)
    first[np.unique(code, return_index=True)[1]] = True  # earliest row of each (group, key)
    candidate = fresh & first
    index = np.flatnonzero(candidate)
    g = group[index]
    starts = np.r_[True, g[1:] != g[:-1]] if g.size else np.zeros(0, bool)
    rank = np.arange(index.size) - np.maximum.accumulate(np.where(starts, np.arange(index.size), 0))
    out = np.zeros(code.size, bool)
    out[index[rank < keep]] = True
    return out


def _distinct_examples(con, top: dict, banded: dict, factor: int) -> tuple[dict, np.ndarray]:
    """The examples kept from the candidates, and the features whose candidates ran short.

    Per feature: the top list takes the first N_TOP candidates with a window not seen before; then
    each band from the highest down takes its first PER_BAND candidates whose window is in none of
    the feature's lists so far. A list that stays short although it got all the candidates asked
    for (N_TOP·factor or PER_BAND·factor) may have more rows in the store: its feature is returned.
    """
    context_id = np.concatenate([top["context_id"], banded["context_id"]]).astype(np.int64)
    position = np.concatenate([top["position"], banded["position"]]).astype(np.int64)
    keys = _window_keys(con, context_id, position)
    n_keys = int(keys.max()) + 1 if keys.size else 1
    n_top = top["feature"].size
    feature = [top["feature"].astype(np.int64), banded["feature"].astype(np.int64)]
    key_top, key_band = keys[:n_top], keys[n_top:]

    keep_top = _first_distinct(feature[0], key_top, np.zeros(0, np.int64), n_keys, N_TOP)
    used = feature[0][keep_top] * n_keys + key_top[keep_top]
    band = banded["band"].astype(np.int64)
    keep_band = np.zeros(band.size, bool)
    for b in range(N_BANDS - 1, -1, -1):
        rows = np.flatnonzero(band == b)  # sorted by feature, then i
        kept = rows[_first_distinct(feature[1][rows], key_band[rows], used, n_keys, PER_BAND)]
        keep_band[kept] = True
        used = np.concatenate([used, feature[1][kept] * n_keys + key_band[kept]])

    short = []
    for f, b, keep, limit in ((feature[0], None, keep_top, N_TOP), (feature[1], band, keep_band, PER_BAND)):
        group = f if b is None else f * N_BANDS + b
        groups, fetched = np.unique(group, return_counts=True)
        kept = np.bincount(np.searchsorted(groups, group[keep]), minlength=groups.size)
        lacking = (kept < limit) & (fetched == limit * factor)
        short.append(groups[lacking] if b is None else groups[lacking] // N_BANDS)
    short_features = np.unique(np.concatenate(short))

    chosen = {key: [] for key in ("feature", "band", "rank", "context_id", "position", "value")}
    for source, keep, band_of in ((top, keep_top, np.full(n_top, -1)), (banded, keep_band, band)):
        f = source["feature"].astype(np.int64)[keep]
        b = band_of[keep]
        group = f * (N_BANDS + 1) + b + 1
        starts = np.r_[True, group[1:] != group[:-1]] if group.size else np.zeros(0, bool)
        index = np.arange(group.size)
        rank = index - np.maximum.accumulate(np.where(starts, index, 0)) + 1
        not_short = ~np.isin(f, short_features)  # a short feature is redone whole with more candidates
        for key, value in (("feature", f), ("band", b), ("rank", rank), ("context_id", source["context_id"][keep]),
                           ("position", source["position"][keep]), ("value", source["value"][keep])):
            chosen[key].append(np.asarray(value)[not_short])
    return {key: np.concatenate(parts) for key, parts in chosen.items()}, short_features


_UNIT_SHIFT = 175  # 2^-175 divides every term S_e · 2^(e-24) below (e ≥ -150)


def _exact_means(con, sae_id: int, width: int) -> np.ndarray:
    """Mean z_f over each feature's rows, correctly rounded: [width] float64, NaN where it never fires.

    ``avg`` over floats depends on the order DuckDB's threads add the partial sums in, so two runs
    could store means differing in the last bits. Here every float32 value v with binary exponent
    e = ⌊log2 |v|⌋ is an exact integer multiple of 2^(e-24) below 2^26 in magnitude, so per
    (feature, e) the integers v·2^(24-e) are summed exactly (HUGEINT) and the exact total is
    divided by the count in Python's exact integer division: the same bits whatever the order.
    (A ⌊log2⌋ off by one at a power of two keeps both properties.) Non-finite values keep ``sum``.
    """
    rows = con.execute(
        """WITH v AS (SELECT feature, value::DOUBLE AS value,
                             CASE WHEN isfinite(value) AND value <> 0 THEN floor(log2(abs(value::DOUBLE)))::INTEGER END AS e
                      FROM feature_acts WHERE sae_id = ?)
           SELECT feature, e, count(*),
                  CASE WHEN e IS NULL THEN sum(value) END,
                  CASE WHEN e IS NOT NULL THEN sum((value * pow(2, 24 - e))::BIGINT) END
           FROM v GROUP BY feature, e""",
        [sae_id],
    ).fetchall()
    counts = [0] * width
    totals = [0] * width  # exact sums in units of 2^-_UNIT_SHIFT
    special: dict[int, float] = {}  # features with an inf or NaN value
    for feature, e, count, plain, scaled in rows:
        counts[feature] += count
        if e is None:
            if plain != 0:  # inf or NaN (zeros are not stored, and would add nothing)
                special[feature] = plain
        else:
            totals[feature] += int(scaled) << (e - 24 + _UNIT_SHIFT)
    mean = np.full(width, np.nan)
    for feature, count in enumerate(counts):
        if count:
            mean[feature] = special[feature] if feature in special else totals[feature] / (count << _UNIT_SHIFT)
    return mean


def _top_k_total(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [n, m] (any device), the k largest entries ordered by (value desc, column asc):
    values and columns [n, k] on the CPU. ``torch.topk`` leaves the order (and the choice) among
    equal values open; here it only finds each row's k-th value, and the candidates ≥ it (usually
    just k) are sorted with the column as tie-breaker. NaN sorts last."""
    key = x.float().masked_fill(torch.isnan(x), float("-inf"))
    kth = key.topk(k, dim=1).values[:, -1:]  # [n, 1]
    rows, cols = (key >= kth).nonzero(as_tuple=True)  # ≥ k per row
    vals = key[rows, cols].double().cpu().numpy()
    rows, cols = rows.cpu().numpy(), cols.cpu().numpy()
    order = np.lexsort((cols, -vals, rows))  # by row, then value desc, then column
    rows, cols = rows[order], cols[order]
    per_row = np.bincount(rows, minlength=x.shape[0])
    keep = np.arange(rows.size) - (np.cumsum(per_row) - per_row)[rows] < k
    index = torch.from_numpy(cols[keep].reshape(x.shape[0], k))
    return x.gather(1, index.to(x.device)).cpu(), index


def _store_related(con, record: SAERecord, directions: torch.Tensor, context_ids_: list[int], ctx_len: int) -> None:
    """Nearest decoder directions, with co-occurrence Jaccard from one streaming pass over the store."""
    con.execute("DELETE FROM feature_related WHERE sae_id = ?", [record.sae_id])
    k = min(N_RELATED, record.width - 1)
    if k <= 0:
        return
    device = directions.device
    features, others, cosines = [], [], []
    for start in range(0, record.width, 1024):
        block = directions[start : start + 1024] @ directions.T  # [b, width] on the device
        diagonal = torch.arange(block.shape[0], device=device)
        block[diagonal, diagonal + start] = -2.0  # not itself
        values, indices = _top_k_total(block, k)  # [b, k] on the CPU; equal cosines (e.g. duplicated directions): lower id first
        features.append(torch.arange(start, start + block.shape[0]).repeat_interleave(k))
        others.append(indices.reshape(-1))
        cosines.append(values.reshape(-1))
    feature, other, cosine = torch.cat(features), torch.cat(others), torch.cat(cosines)  # [width·k] each, feature-major

    both = _cooccurrence(con, record, other.view(record.width, k).to(device), context_ids_, ctx_len).reshape(-1).cpu()
    n_fired = torch.zeros(record.width, dtype=torch.int64)
    for f, n in con.execute("SELECT feature, n_fired FROM feature_stats WHERE sae_id = ?", [record.sae_id]).fetchall():
        n_fired[f] = n
    union = n_fired[feature] + n_fired[other] - both
    jaccard = torch.where(union > 0, both.double() / union.clamp(min=1), torch.zeros_like(both, dtype=torch.float64))
    insert_arrow(con, "feature_related", pa.table({
        "sae_id": np.full(feature.numel(), record.sae_id, np.int32),
        "feature": feature.numpy().astype(np.int32),
        "other": other.numpy().astype(np.int32),
        "cosine": cosine.numpy().astype(np.float32),
        "cooccurrence": jaccard.numpy().astype(np.float32),
    }))


def _cooccurrence(con, record: SAERecord, others: torch.Tensor, context_ids_: list[int], ctx_len: int) -> torch.Tensor:
    """both[f, j] = #{tokens where f and others[f, j] both fire}: [width, k] int64 on others' device.

    Per step of COOC_TOKENS tokens, the stored nonzeros (t, f) become sorted keys t·width + f, and for
    every nonzero and each of its feature's k related features g the key t·width + g is looked up
    (``searchsorted``). Memory: the step's keys, 24 bytes per nonzero on the device, plus
    COOC_LOOKUPS lookups of ~25 bytes at a time; nothing of size tokens × width (or × k × k) exists.
    """
    width, k = others.shape
    device = others.device
    both = torch.zeros(width, k, dtype=torch.int64, device=device)
    per_chunk = max(1, COOC_TOKENS // ctx_len)
    step = max(1, COOC_LOOKUPS // k)  # nonzeros looked up at a time
    for start in range(0, len(context_ids_), per_chunk):
        chunk = context_ids_[start : start + per_chunk]
        rows = con.execute(
            """SELECT context_id, position, feature FROM feature_acts
               WHERE sae_id = ? AND context_id IN (SELECT unnest(?::BIGINT[]))""",
            [record.sae_id, chunk],
        ).fetchnumpy()
        slot = np.searchsorted(np.asarray(chunk, np.int64), rows["context_id"])  # chunk ids are ascending
        token = torch.from_numpy(slot * ctx_len + rows["position"].astype(np.int64)).to(device)  # [nnz]
        fired = torch.from_numpy(rows["feature"].astype(np.int64)).to(device)  # [nnz]
        keys = (token * width + fired).sort().values  # [nnz], unique: a token fires a feature once
        for i in range(0, keys.numel(), step):  # none when the chunk stored nothing
            t, f = token[i : i + step], fired[i : i + step]  # [s]
            query = t[:, None] * width + others[f]  # [s, k]: (token, related feature) keys
            found = keys[torch.searchsorted(keys, query).clamp_(max=keys.numel() - 1)] == query  # [s, k]
            both.index_add_(0, f, found.long())
    return both


def unembedding(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_U [vocab, d], final-norm weight γ [d]) of a Hugging Face causal LM under the bridge."""
    hf = model.original_model
    w_u = hf.get_output_embeddings().weight.detach().float()
    norm = getattr(getattr(hf, "model", hf), "norm", None)
    weight = getattr(norm, "weight", None)
    gamma = weight.detach().float() if weight is not None else torch.ones(w_u.shape[1], device=w_u.device)
    return w_u, gamma


def logit_effects(directions: torch.Tensor, model, unembed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(d_f ⊙ γ) W_Uᵀ for a block of directions [n, d] (any device / dtype): [n, vocab] on the model's device;
    ``unembed``: ``unembedding(model)`` once for a loop over blocks (a bf16 W_U converted once, not per block)."""
    w_u, gamma = unembed or unembedding(model)
    return (directions.float().to(w_u.device) * gamma) @ w_u.T


def _store_logit_effects(con, record: SAERecord, directions: torch.Tensor, loaded) -> None:
    con.execute("DELETE FROM feature_logits WHERE sae_id = ?", [record.sae_id])
    rows = {"feature": [], "rank": [], "token_id": [], "effect": []}
    unembed = unembedding(loaded.model)
    for start in range(0, record.width, 512):
        effects = logit_effects(directions[start : start + 512], loaded.model, unembed)  # [b, vocab]
        for sign in (1, -1):
            values, indices = _top_k_total(sign * effects, N_LOGITS)  # equal effects: lower token id first
            n = indices.shape[0]
            rows["feature"].append(torch.arange(start, start + n).repeat_interleave(N_LOGITS))
            rows["rank"].append((sign * torch.arange(1, N_LOGITS + 1)).repeat(n))
            rows["token_id"].append(indices.reshape(-1))
            rows["effect"].append(sign * values.reshape(-1))
    columns = {key: torch.cat(parts).numpy() for key, parts in rows.items()}
    insert_arrow(con, "feature_logits", pa.table({
        "sae_id": np.full(columns["feature"].shape[0], record.sae_id, np.int32),
        "feature": columns["feature"].astype(np.int32),
        "rank": columns["rank"].astype(np.int16),
        "token_id": columns["token_id"].astype(np.int32),
        "effect": columns["effect"].astype(np.float32),
    }))

