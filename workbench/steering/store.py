"""Named steering specs in the workspace's own specs folder: the only place the app writes.

    workspaces/default.duckdb  →  workspaces/default.specs/NAME.json

``NAME`` goes through ``safety.check_name`` (one path component: letters, digits, '.', '_', '-',
a letter or digit first) and the final path through ``safety.confined``, so no name, however it
is spelt, writes outside that folder. An existing spec is replaced only with ``overwrite=True``.
``workbench steer --spec FILE`` still reads any file the user names; only writing is confined.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from workbench.safety import NAME_CHARS, UnsafeInputError, check_name, confined

from .spec import SteeringError, SteeringSpec

SPECS_SUFFIX = ".specs"
WORKSPACE_SUFFIX = ".duckdb"
MAX_NAME = 128  # check_name's own limit; longer names are refused without echoing them


def spec_folder(db_path: str | Path) -> Path:
    """``<workspace without .duckdb>.specs`` beside the workspace file (not created here)."""
    db = Path(db_path).expanduser().resolve()
    stem = db.name[: -len(WORKSPACE_SUFFIX)] if db.name.endswith(WORKSPACE_SUFFIX) and db.name != WORKSPACE_SUFFIX else db.name
    return db.with_name(stem + SPECS_SUFFIX)


def spec_path(db_path: str | Path, name: str) -> Path:
    """Where spec ``name`` lives (``NAME.json`` in ``spec_folder``), or a one-line error for a bad name.

    A trailing ``.json`` in ``name`` is dropped (``steer-3`` and ``steer-3.json`` are the same spec)."""
    if not isinstance(name, str) or not name:
        raise UnsafeInputError(f"give the spec a name: {NAME_CHARS}")
    if len(name) > MAX_NAME:
        raise UnsafeInputError(f"spec name is {len(name):,} characters long: use at most {MAX_NAME} ({NAME_CHARS})")
    stem = name[: -len(".json")] if name.endswith(".json") and len(name) > len(".json") else name
    check_name(stem, "spec name")
    return confined(spec_folder(db_path), stem + ".json")


def save_named(spec: SteeringSpec, db_path: str | Path, name: str, overwrite: bool = False) -> Path:
    """Write ``spec`` as ``<workspace>.specs/NAME.json``; the path written. An existing spec is
    kept (one-line error) unless ``overwrite``; nothing is created when the name is refused."""
    if not isinstance(spec, SteeringSpec):
        raise SteeringError(f"save_named writes a SteeringSpec, got {type(spec).__name__}")
    target = spec_path(db_path, name)  # validates before anything touches the disk
    folder = spec_folder(db_path)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UnsafeInputError(f"the specs folder {folder} is not a plain folder: move it away to save specs")
    if target.parent != folder.resolve():  # confined() allows subfolders; a name never makes one
        raise UnsafeInputError(f"{target} is not directly in {folder}")
    if target.exists() and not overwrite:
        raise SteeringError(f"spec '{target.stem}' exists in {folder}: tick 'Overwrite' to replace it, or choose another name")
    if target.exists() and not target.is_file():
        raise SteeringError(f"{target} exists and is not a file: choose another name")
    text = spec.to_json() + "\n"
    try:
        folder.mkdir(exist_ok=True)
        if overwrite:  # write beside it, then rename over it: a reader never sees half a spec
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.stem}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a replaced spec unreadable to others
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            with open(target, "x") as fh:  # O_EXCL: fails on anything already there, links included
                fh.write(text)
    except FileExistsError:
        raise SteeringError(f"spec '{target.stem}' exists in {folder}: tick 'Overwrite' to replace it, or choose another name") from None
    except OSError as err:
        raise SteeringError(f"cannot write steering spec {target}: {err.strerror or err.__class__.__name__}") from None
    return target
