"""Every relative link in the README and docs/ resolves: the file exists and, when the link names
a heading (#anchor), the page has that heading (GitHub's anchor rules: lower case, punctuation
dropped, spaces to hyphens)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lstrip("#").strip()).lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(page: Path) -> set[str]:
    return {anchor(line) for line in page.read_text().splitlines() if line.startswith("#")}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{target} (no such heading)")
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target} (outside the repository)")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_anchor_rule():
    assert anchor("### Devices: a training step that never waits for the host") == "devices-a-training-step-that-never-waits-for-the-host"
    assert anchor("## The default model and corpus (offline)") == "the-default-model-and-corpus-offline"
