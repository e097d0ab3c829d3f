"""A small analysed workspace for the app tests, built once per session (~15 s on 2 cores).

tiny-llama at blocks.1.hook_resid_post (8,192 tokens in contexts of 64), a TopK SAE with 128
latents and k = 4, analysed with logit effects.

The Experts and Sparsity page tests also use ``tiny_mixtral`` and ``sparsity_db`` from tests/conftest.py.
"""

import shutil
from pathlib import Path

import pytest

from workbench.cli import main

HOOK = "blocks.1.hook_resid_post"
SAE = "tiny-topk"
APP = Path(__file__).resolve().parents[2] / "app"
HOME = APP / "Home.py"
PAGES = {
    "home": None,
    "feature": "pages/1_Feature.py",
    "features": "pages/1_Features.py",
    "compare": "pages/2_Compare_SAEs.py",
    "prompt": "pages/3_Prompt_inspector.py",
    "steering": "pages/4_Steering.py",
    "sparsity": "pages/5_Sparsity.py",
    "experts": "pages/6_Experts.py",
}


@pytest.fixture(scope="session")
def app_workspace(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("app") / "ws.duckdb"
    assert main(["cache", "--model", "tiny-llama", "--hook", HOOK, "--tokens", "8192", "--ctx", "64", "--db", str(db)]) == 0
    assert main(["train", "--db", str(db), "--hook", HOOK, "--arch", "topk", "--width", "128", "--k", "4",
                 "--tokens", "16384", "--batch-size", "512", "--no-downstream", "--name", SAE]) == 0
    assert main(["analyze", "--db", str(db), "--sae", SAE]) == 0
    return db


@pytest.fixture(scope="session")
def busiest_feature(app_workspace) -> int:
    """The feature that fires most often: it has top examples, bands, neighbours and logit effects."""
    from workbench.workspace import Workspace

    with Workspace(app_workspace, read_only=True) as ws:
        return ws.query("SELECT feature FROM feature_stats ORDER BY n_fired DESC, feature LIMIT 1")[0][0]


@pytest.fixture
def workspace_copy(app_workspace, tmp_path) -> Path:
    """A private copy (new path, so nothing the app has cached for the original applies to it)."""
    db = tmp_path / "copy.duckdb"
    shutil.copy(app_workspace, db)
    return db


@pytest.fixture
def open_page(monkeypatch):
    """``open_page(db, "feature", sae=..., feature=...)``: an AppTest run of one page with WORKBENCH_DB=db."""
    from streamlit.testing.v1 import AppTest

    def run(db, page: str = "home", **query):
        monkeypatch.setenv("WORKBENCH_DB", str(db))
        at = AppTest.from_file(str(HOME), default_timeout=60)
        if PAGES[page]:
            at.switch_page(PAGES[page])
        at.query_params.update({k: str(v) for k, v in query.items()})
        return at.run()

    return run
