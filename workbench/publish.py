"""Crash-safe publishing of a directory: build it in a temporary sibling, then rename it into place.

A reader never sees a half-written directory: until the rename, the files live in a hidden
``.<name>-XXXX`` sibling (on the same filesystem, so the rename is atomic), removed whatever
happens. Used for converted models (``workbench.models``) and for the tiny-LM token data and
checkpoints (``workbench.tinylm``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def publish_dir(target: Path, build: Callable[[Path], None], *, replace: bool = False) -> None:
    """Build a directory in a temporary sibling and rename it into place (crash-safe).

    ``build(staging)`` writes the files. With ``replace``, an existing ``target`` is removed just
    before the rename; without it, an existing non-empty ``target`` stays. A rename that fails
    because another process published ``target`` first is not an error; any other failure is.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        if target.exists() and replace:
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:  # another process published it first
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
