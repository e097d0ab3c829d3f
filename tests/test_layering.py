"""The packages depend one way: data, saes → workbench (core) → probes → the CLI and the app.

Every import statement in the packages, lazy ones inside functions included, is parsed and
checked against ``ALLOWED``. ``workbench.cli`` is the command line: it sits on top of
everything (it serves the app and runs the probes), so it is its own layer although it lives in
the ``workbench`` folder.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "saes", "workbench", "probes", "app")
ALLOWED = {
    "data": {"data"},
    "saes": {"saes"},
    "workbench": {"data", "saes", "workbench"},
    "probes": {"data", "saes", "workbench", "probes"},
    "app": {"data", "saes", "workbench", "probes", "app"},
    "workbench.cli": {"data", "saes", "workbench", "probes", "app", "workbench.cli"},
}


# The folders data/ and app/ install as workbench.data and workbench.app (pyproject's package-dir),
# so their modules are named under ``workbench`` although they sit beside it.
INSTALLED_AS = {"data": "workbench.data", "app": "workbench.app"}
NESTED_LAYERS = ("workbench.cli", "workbench.data", "workbench.app")


def layer(module: str) -> str | None:
    """The layer of a dotted module name, or None for a module outside the project."""
    if module == "workbench.__main__":  # `python -m workbench` / `torchrun -m workbench`: the command line
        return "workbench.cli"
    for nested in NESTED_LAYERS:
        if module == nested or module.startswith(nested + "."):
            return nested.removeprefix("workbench.") if nested != "workbench.cli" else nested
    top = module.split(".")[0]
    return top if top in PACKAGES and top not in INSTALLED_AS else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    top, dot, rest = name.partition(".")
    return INSTALLED_AS[top] + dot + rest if top in INSTALLED_AS else name


def imports(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for every import in module ``name``'s ``source``, relative ones resolved."""
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]  # `from workbench import cli`
    return out


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_the_layers_cover_every_package():
    assert {layer(module_name(p)) for p in sources()} == set(ALLOWED)


def violations(source: str, name: str, is_package: bool = False) -> list[str]:
    own = layer(name)
    return [f"line {line}: {own} imports {target} ({layer(target)})" for line, target in imports(source, name, is_package)
            if layer(target) is not None and layer(target) not in ALLOWED[own]]


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    wrong = violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not wrong, f"{path.relative_to(ROOT)}: " + "; ".join(wrong)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_by_folder_name(path):
    """``import data`` would work from the checkout but not once installed: the names are workbench.data/app."""
    wrong = [f"line {line}: {target}" for line, target in imports(path.read_text(), module_name(path), path.name == "__init__.py")
             if target.split(".")[0] in INSTALLED_AS]
    assert not wrong, f"{path.relative_to(ROOT)}: " + "; ".join(wrong)


@pytest.mark.parametrize("source, name, is_package, flagged", [
    ("def f():\n    from probes import experts", "workbench.training", False, ["probes", "probes"]),
    ("from ..cli import main", "workbench.steering.hooks", False, ["workbench.cli", "workbench.cli"]),
    ("from . import cli", "workbench", True, ["workbench.cli"]),
    ("import workbench.app.cached", "probes.moe_runs", False, ["app"]),
    ("from workbench.errors import WorkbenchError", "saes.io", False, ["workbench", "workbench"]),
    ("from probes import experts\nimport workbench.app", "workbench.cli.probes", False, []),
    ("from workbench.data.corpus import load_corpus", "workbench.data.labelled", False, []),
    ("from workbench.models import load_model", "workbench.data.corpus", False, ["workbench", "workbench"]),
    ("from workbench.app.render import escape", "workbench.caching", False, ["app", "app"]),
    ("from .spec import SteeringSpec", "workbench.steering.hooks", False, []),
])
def test_the_checker_catches_back_edges(source, name, is_package, flagged):
    assert [v.rpartition("(")[2].rstrip(")") for v in violations(source, name, is_package)] == flagged
