"""Shared fixtures. Tests never touch the network or the user's cache.

The environment is set at import time so subprocesses (CLI kill/resume tests) inherit it:
the hub is offline, and converted models go to a cache directory private to this test session.
"""

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("WORKBENCH_CACHE", tempfile.mkdtemp(prefix="workbench-test-cache-"))


@pytest.fixture(scope="session")
def tiny():
    """The 2-layer random Llama (d_model 64) with SmolLM2's tokenizer."""
    from workbench.models import load_model

    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """The real default model; only for tests marked slow."""
    from workbench.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def stdlib_corpus():
    from data import load_corpus

    return load_corpus("stdlib")


@pytest.fixture
def workspace_path(tmp_path: Path) -> Path:
    return tmp_path / "ws.duckdb"


@pytest.fixture
def table_digest():
    """``digest(db)`` → {table: sha256 of its columns and of all its rows in a total order}, read
    through a read-only connection; equal digests before and after mean nothing was written."""
    import hashlib

    import duckdb

    def digest(db) -> dict[str, str]:
        con = duckdb.connect(str(db), read_only=True)
        try:
            out = {}
            for (table,) in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall():
                columns = con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                      "WHERE table_name = ? ORDER BY ordinal_position", [table]).fetchall()
                quoted = '"' + table.replace('"', '""') + '"'
                rows = con.execute(f"SELECT * FROM {quoted} ORDER BY ALL").fetchall()
                out[table] = hashlib.sha256(repr((columns, rows)).encode()).hexdigest()
            return out
        finally:
            con.close()

    return digest
