"""Guards for user-provided strings that reach SQL text or the file system.

Three rules, each with one function that every caller goes through:

- **Names** (an SAE's ``--name``, a saved steering spec) become one path component under a
  folder the workbench owns, so they are limited to ``NAME_CHARS``: a letter or digit first,
  then letters, digits, ``.``, ``_``, ``-`` (at most 128 characters). No separator, no ``..``,
  no leading dot, nothing the shell or SQL treats specially.
- **SQL literals**: values are bound as parameters (``?``) everywhere DuckDB allows it. Where
  it does not (``COPY ... TO 'file'``), ``sql_string`` quotes the value: single quotes are
  doubled, and NUL or other control characters are refused.
- **Confinement**: ``confined(root, path)`` returns ``path`` resolved, or refuses it when it
  escapes ``root`` (through ``..``, an absolute path or a symbolic link).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from workbench.errors import WorkbenchError

NAME_CHARS = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnsafeInputError(WorkbenchError):
    """A user-provided string that would escape its folder or its place in an SQL statement."""


def check_name(name: str, what: str = "name") -> str:
    """``name`` if it is a safe single path component (``NAME_CHARS``), else a one-line error."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UnsafeInputError(f"invalid {what} {name!r}: use {NAME_CHARS}")
    return name


def sql_string(value: str) -> str:
    """``value`` as a single-quoted SQL string literal, for the few places DuckDB cannot bind."""
    if _CONTROL.search(value):
        raise UnsafeInputError(f"control characters are not allowed in {value!r}")
    return "'" + value.replace("'", "''") + "'"


def confined(root: str | Path, path: str | Path) -> Path:
    """``path`` (relative paths are taken from ``root``) resolved, when it stays inside ``root``."""
    base = Path(root).expanduser().resolve()
    target = (base / Path(path).expanduser()).resolve()
    if target != base and base not in target.parents:
        raise UnsafeInputError(f"{path} is outside {base}: only files inside that folder may be written")
    return target


def probe_write(folder: str | Path) -> None:
    """Create and remove a file in ``folder``; raises ``OSError`` where that fails. A real write,
    because ``os.access`` says yes to root even on a read-only mount."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".workbench-probe-"):
        pass


def check_writable_dir(folder: str | Path, what: str) -> Path:
    """Create ``folder`` (with parents) if needed and check that files can be written in it,
    before any long job starts; the error names the folder."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UnsafeInputError(f"{what} {folder} exists and is not a folder: choose a new path")
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnsafeInputError(f"cannot create {what} {folder}: {err.strerror or err}") from None
    try:
        probe_write(folder)
    except OSError as err:
        for made in missing:  # leave nothing behind
            made.rmdir()
        raise UnsafeInputError(f"{what} {folder} is not writable ({err.strerror or err}): choose another folder") from None
    return folder
