"""The built-in offline corpus ``stdlib``: real text that ships with Python and its packages.

Domains and sources (nothing here was written by this project):

- ``prose``: every topic of ``pydoc_data.topics`` (source ``pydoc_data.topics:NAME``) and the
  module docstring of every standard-library module, read with ``ast`` and never imported
  (source ``docstring:REL/PATH.py``).
- ``code``: the source of every standard-library module (source ``stdlib:REL/PATH.py``). Skipped:
  ``site-packages``, ``test``/``tests`` folders (which holds ``lib2to3``'s test data),
  ``idlelib``, ``turtledemo``, files over 200 kB and non-``.py`` files.
- ``license``: Python's ``LICENSE.txt`` (source ``license:python/LICENSE.txt``) and each
  ``LICENSE*``/``LICENCE*``/``COPYING*`` file that an installed distribution's ``RECORD`` lists
  inside its ``.dist-info`` folder (source ``license:NAME-VERSION.dist-info/...``).
- ``package``: the long description of each installed distribution (source ``package:NAME``).

Deduplicated: exact and near-duplicate documents are dropped, the first by source of each group
kept (``workbench.data.dedup``; most of what goes is the same licence shipped by many packages);
``stdlib_dedup_report`` says how many per domain.

Deterministic: documents are sorted by source, so for one Python version and one set of
installed distributions the tuple is identical. The ``license`` and ``package`` parts depend on
what is installed in this interpreter's site-packages; editable installs (the project itself)
are skipped. Empty and whitespace-only texts are skipped.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import io
import json
import os
import re
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

from workbench.data.dedup import Deduplicated, DomainCounts, deduplicate
from workbench.data.documents import Document

_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__"}
)
_MAX_SOURCE_BYTES = 200_000
_LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING")


@functools.lru_cache(maxsize=1)
def stdlib_documents() -> tuple[Document, ...]:
    """The documents of the built-in corpus, deduplicated, sorted by source (cached per process)."""
    return stdlib_deduplicated().documents


def stdlib_dedup_report() -> dict[str, DomainCounts]:
    """Per domain of the built-in corpus: documents kept, and dropped as exact and as near duplicates."""
    return dict(stdlib_deduplicated().report)


@functools.lru_cache(maxsize=1)
def stdlib_deduplicated() -> Deduplicated:
    """``raw_stdlib_documents`` without duplicates (``workbench.data.dedup``), and what was dropped (cached per process)."""
    return deduplicate(raw_stdlib_documents())


def raw_stdlib_documents() -> tuple[Document, ...]:
    """Every document of the built-in corpus before deduplication, sorted by source (built on each call)."""
    documents = [
        *_topic_documents(),
        *_module_documents(_stdlib_dir()),
        *_license_documents(),
        *_package_documents(),
    ]
    kept = (doc for doc in documents if doc.text.strip())
    return tuple(sorted(kept, key=lambda doc: (doc.source, doc.domain, doc.text)))


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _topic_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics  # a data-only module: importing it has no side effects

    for name, text in topics.items():
        yield Document(text, "prose", f"pydoc_data.topics:{name}")


def _module_documents(root: Path) -> Iterator[Document]:
    """Source (``code``) and module docstring (``prose``) of each standard-library module."""
    for path in _module_files(root):
        rel = path.relative_to(root).as_posix()
        source = _decode_source(path.read_bytes())
        yield Document(source, "code", f"stdlib:{rel}")
        docstring = _module_docstring(source)
        if docstring:
            yield Document(docstring, "prose", f"docstring:{rel}")


def _module_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if name.endswith(".py") and path.stat().st_size <= _MAX_SOURCE_BYTES:
                files.append(path)
    return files


def _decode_source(raw: bytes) -> str:
    """Decode Python source with its declared encoding (PEP 263), replacing bad bytes."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    except SyntaxError:
        encoding = "utf-8"
    return raw.decode(encoding, errors="replace")


def _module_docstring(source: str) -> str | None:
    try:
        return ast.get_docstring(ast.parse(source))
    except (SyntaxError, ValueError):  # ValueError: source with null bytes
        return None


def _installed_distributions() -> list[importlib.metadata.Distribution]:
    """Distributions in this interpreter's site-packages, editable installs left out."""
    paths = sysconfig.get_paths()
    site_dirs = sorted({paths["purelib"], paths["platlib"]})
    dists = importlib.metadata.distributions(path=site_dirs)
    return [d for d in dists if d.metadata is not None and d.metadata["Name"]
            and not _is_editable(d)]


def _is_editable(dist: importlib.metadata.Distribution) -> bool:
    try:
        direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    except (OSError, ValueError):
        return False
    return bool(direct_url.get("dir_info", {}).get("editable", False))


def _license_documents() -> Iterator[Document]:
    python_license = _stdlib_dir() / "LICENSE.txt"
    if python_license.is_file():
        yield Document(_read_lenient(python_license), "license", "license:python/LICENSE.txt")
    for dist in _installed_distributions():
        for file in dist.files or ():
            in_dist_info = len(file.parts) > 1 and file.parts[0].endswith(".dist-info")
            if in_dist_info and file.name.upper().startswith(_LICENSE_PREFIXES):
                try:
                    text = _read_lenient(Path(file.locate()))
                except OSError:  # listed in RECORD but missing on disk
                    continue
                yield Document(text, "license", f"license:{file.as_posix()}")


def _package_documents() -> Iterator[Document]:
    by_name: dict[str, Document] = {}
    for dist in _installed_distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        by_name.setdefault(name, Document(_long_description(dist), "package", f"package:{name}"))
    yield from by_name.values()


def _long_description(dist: importlib.metadata.Distribution) -> str:
    """The metadata body (Metadata 2.1+) or else the folded ``Description`` header."""
    payload = dist.metadata.get_payload()
    if isinstance(payload, str) and payload.strip():
        return payload
    header = dist.metadata["Description"] or ""
    first, *rest = header.split("\n")
    return "\n".join([first, *(re.sub(r"^(?: {8}| {7}\|)", "", line) for line in rest)])


def _read_lenient(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")
