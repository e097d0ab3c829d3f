"""Fixtures for the bad-input tests of the CLI: a private copy of a workspace, the files under a folder,
and the one-line check of an error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.errors import BAD_INPUT, FAILURE


@pytest.fixture
def private_copy(tmp_path, monkeypatch):
    """``private_copy(db)``: a copy of workspace ``db`` (and of its weights folder, if any) in ``tmp_path/home``;
    the test then runs inside ``tmp_path``, so a file written relative to the current folder lands where it is seen."""

    def copy(db: Path) -> Path:
        home = tmp_path / "home"
        home.mkdir()
        shutil.copy(db, home / db.name)
        if db.with_suffix(".saes").is_dir():
            shutil.copytree(db.with_suffix(".saes"), home / db.with_suffix(".saes").name)
        monkeypatch.chdir(tmp_path)
        return home / db.name

    return copy


@pytest.fixture
def files_under():
    """``files_under(root)``: every path below ``root``, relative to it."""
    return lambda root: {str(p.relative_to(root)) for p in Path(root).rglob("*")}


@pytest.fixture
def expect_one_line():
    """``expect_one_line(argv, capsys, status=BAD_INPUT)``: runs the CLI and returns its error line. stderr must
    be exactly one line; a job that failed midway may have drawn progress bars first, and its error is then the
    last line."""

    def run(argv: list[str], capsys, status: int = BAD_INPUT) -> str:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == status, err
        assert "Traceback" not in err, err
        if status == FAILURE:
            err = err.splitlines()[-1]
        assert err.startswith("workbench: error: ") and "\n" not in err, err
        return err

    return run
