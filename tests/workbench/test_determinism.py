"""Two identical `workbench analyze` runs store identical feature tables, and every ordering with
ties follows its documented tie-breaker.

The SAE is built by hand so that ties are everywhere: eight latents read nothing and fire with
the same constant on every token (every top or band example is a tie), sixteen read one float16
residual coordinate plus a constant (many exactly equal values), and eight decoder rows are the
same direction (equal cosines to every other latent). With k = 28 the store holds well over one
DuckDB row group, so its aggregates run on several threads.
"""

import math
import shutil
from fractions import Fraction

import pytest
import torch

import saes
from workbench import analysis
from workbench.activations import context_ids, read_contexts
from workbench.cli import main
from workbench.training import register_saved
from workbench.workspace import Workspace, resolve_sae

HOOK = "blocks.1.hook_resid_post"
WIDTH, K = 64, 28
CONSTANT, ONE_HOT = range(0, 8), range(8, 24)
FEATURE_TABLES = ("feature_acts", "feature_stats", "feature_examples", "feature_logits", "feature_related")


def tied_sae(max_abs: float) -> torch.nn.Module:
    sae = saes.build(saes.SAEConfig(d_in=64, width=WIDTH, k=K, arch="topk"))
    g = torch.Generator().manual_seed(0)
    lift = 2.0 ** math.ceil(math.log2(4 * max_abs + 1))  # exact, and far above any residual coordinate
    w_enc = 0.1 * torch.randn(64, WIDTH, generator=g) / math.sqrt(64) * (lift / 8)
    b_enc = torch.zeros(WIDTH)
    w_enc[:, list(CONSTANT)] = 0.0
    b_enc[list(CONSTANT)] = 2 * lift  # z = 2·lift on every token
    w_enc[:, list(ONE_HOT)] = 0.0
    for j, f in enumerate(ONE_HOT):
        w_enc[j, f] = 1.0  # z = x_j + lift: as tied as the float16 cache
    b_enc[list(ONE_HOT)] = lift
    w_dec = torch.nn.functional.normalize(torch.randn(WIDTH, 64, generator=g), dim=1)
    w_dec[list(CONSTANT)] = torch.nn.functional.one_hot(torch.tensor(0), 64).float()  # one shared direction
    w_dec[list(ONE_HOT)[:8]] = torch.nn.functional.normalize(w_dec[list(ONE_HOT)[:8]] + 3 * w_dec[0], dim=1)  # near it
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_dec.zero_()
    return sae.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny):
    """The same workspace analysed twice from scratch (two copies, each in its own run)."""
    root = tmp_path_factory.mktemp("determinism")
    base = root / "base.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "6400", "--ctx", "64", "--db", str(base)]) == 0
    with Workspace(base) as ws:
        acts = read_contexts(ws, HOOK, context_ids(ws, HOOK))
        saes.save_sae(tied_sae(float(acts.abs().max())), root / "tied")
        register_saved(ws, root / "tied", HOOK, name="tied")
    paths = []
    for copy in ("a", "b"):
        path = root / f"{copy}.duckdb"
        shutil.copy(base, path)
        with Workspace(path) as ws:
            ws.con.execute("SET threads = 4")
            analysis.analyze(ws, "tied", model=tiny, batch_contexts=16, progress=False)
        paths.append(path)
    return paths


def _plain(rows):
    """Rows with NaN made equal to NaN (dead latents have NaN mean and max)."""
    return [tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in row) for row in rows]


def table_rows(path, table):
    with Workspace(path, read_only=True) as ws:
        return _plain(ws.query(f"SELECT * FROM {table} ORDER BY ALL"))


@pytest.mark.parametrize("table", FEATURE_TABLES)
def test_two_runs_store_identical_tables(runs, table):
    a, b = (table_rows(path, table) for path in runs)
    assert a, f"{table} is empty"
    assert a == b


def test_the_store_is_full_of_ties(runs):
    with Workspace(runs[0], read_only=True) as ws:
        (rows,), = ws.query("SELECT count(*) FROM feature_acts")
        (tied,), = ws.query("SELECT sum(n) FROM (SELECT count(*) AS n FROM feature_acts GROUP BY feature, value) WHERE n > 1")
        assert rows > 122_880  # more than one row group
        assert tied > rows / 2  # most rows share their value with another row of their feature


def test_top_examples_follow_value_then_context_then_position(runs):
    with Workspace(runs[0], read_only=True) as ws:
        stored = ws.query("SELECT feature, rank, context_id, position, value FROM feature_examples WHERE band = -1 ORDER BY ALL")
        expected = ws.query(
            f"""SELECT feature, row_number() OVER (PARTITION BY feature ORDER BY value DESC, context_id, position) AS rank,
                       context_id, position, value
                FROM feature_acts QUALIFY rank <= {analysis.N_TOP} ORDER BY ALL""")
    assert stored == expected
    assert {f for f, *_ in stored} >= set(CONSTANT)


def test_band_examples_follow_hash_then_context_then_position(runs):
    """Band examples are drawn in the total order (hash, context, position); a window the page
    already shows is skipped (tests/workbench/test_distinct_examples.py checks which), so each band's
    examples are a subsequence of that order, ranked 1..n."""
    with Workspace(runs[0], read_only=True) as ws:
        stored = ws.query("SELECT feature, band, rank, context_id, position FROM feature_examples WHERE band >= 0 ORDER BY ALL")
        order = ws.query(
            f"""WITH banded AS (
                    SELECT a.*, least({analysis.N_BANDS - 1}, floor(a.value / s.max_value * {analysis.N_BANDS}))::SMALLINT AS band
                    FROM feature_acts a JOIN feature_stats s USING (sae_id, feature))
                SELECT feature, band, context_id, position FROM banded
                ORDER BY feature, band, hash(context_id, position), context_id, position""")
    candidates: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for feature, band, context, position in order:
        candidates.setdefault((feature, band), []).append((context, position))
    picked: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for feature, band, rank, context, position in stored:
        picked.setdefault((feature, band), []).append((rank, context, position))
    assert picked
    for key, rows in picked.items():
        assert [r for r, _, _ in rows] == list(range(1, len(rows) + 1)) and len(rows) <= analysis.PER_BAND
        walk = iter(candidates[key])
        assert all((c, p) in walk for _, c, p in rows), key  # a subsequence, in order


def test_related_features_break_equal_cosines_by_id(runs):
    with Workspace(runs[0], read_only=True) as ws:
        record = resolve_sae(ws, "tied")
        stored = ws.query("SELECT feature, other, cosine FROM feature_related ORDER BY feature, cosine DESC, other")
    directions = analysis.decoder_directions(saes.load_sae(record.path))
    cosine = directions @ directions.T
    expected = []
    for f in range(WIDTH):
        others = sorted((g for g in range(WIDTH) if g != f), key=lambda g: (-float(cosine[f, g]), g))[: analysis.N_RELATED]
        expected += [(f, g, float(cosine[f, g])) for g in others]
    assert stored == expected
    assert [g for f, g, _ in stored if f == 0] == [1, 2, 3, 4, 5]  # seven exact ties (cosine 1) for five places


def test_logit_ranks_are_total(runs, tiny):
    with Workspace(runs[0], read_only=True) as ws:
        record = resolve_sae(ws, "tied")
        stored = ws.query("SELECT feature, rank, token_id, effect FROM feature_logits ORDER BY feature, abs(rank), rank")
    effects = analysis.logit_effects(analysis.decoder_directions(saes.load_sae(record.path)), tiny.model).cpu()
    for f in (0, 8, 30):
        rows = [(rank, token, effect) for feature, rank, token, effect in stored if feature == f]
        promoted = sorted(range(effects.shape[1]), key=lambda t: (-float(effects[f, t]), t))[: analysis.N_LOGITS]
        suppressed = sorted(range(effects.shape[1]), key=lambda t: (float(effects[f, t]), t))[: analysis.N_LOGITS]
        assert [t for r, t, _ in rows if r > 0] == promoted
        assert [t for r, t, _ in rows if r < 0] == suppressed


def test_means_are_correctly_rounded(runs):
    """The mean is the exact sum over the count, rounded once: no summation order shows."""
    with Workspace(runs[0], read_only=True) as ws:
        values = {}
        for feature, value in ws.query("SELECT feature, value FROM feature_acts WHERE feature IN (8, 9, 30, 40)"):
            values.setdefault(feature, []).append(value)
        means = dict(ws.query("SELECT feature, mean_value FROM feature_stats WHERE feature IN (8, 9, 30, 40)"))
    for feature, vs in values.items():
        assert means[feature] == float(sum(map(Fraction, vs)) / len(vs))
