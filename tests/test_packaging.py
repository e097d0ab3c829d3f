"""What the wheel installs: three import names (workbench, saes, probes), with the data/ and app/
folders under workbench as workbench.data and workbench.app, pages included.

The wheel is built from a copy of the sources in a temporary folder, so the checkout gains no
build/ or egg-info folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("workbench", "saes", "probes", "data", "app")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(out)!r})"],
                   cwd=src, check=True, capture_output=True)
    (wheel,) = out.glob("*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_only_three_import_names_are_installed(wheel_names):
    tops = {name.split("/")[0] for name in wheel_names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"workbench", "saes", "probes"}


def test_every_source_file_is_in_the_wheel(wheel_names):
    installed_as = {"data": "workbench/data", "app": "workbench/app"}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT / folder).as_posix()
            assert f"{installed_as.get(folder, folder)}/{rel}" in wheel_names, f"{folder}/{rel} is not installed"
