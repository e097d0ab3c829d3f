"""Whether the Hugging Face hub can be asked at all, decided once per process in at most a few seconds.

Offline (``HF_HUB_OFFLINE=1``, or no route to the hub's host) a hub name must fail fast with one
line instead of a minute of retries; files already in the local Hugging Face cache still load.
So when the hub is unreachable, ``hub_unreachable`` also puts ``huggingface_hub``, ``datasets``
and ``transformers`` in their offline mode for the rest of the process: they then read their
local caches and fail at once on a miss.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (one phrase), or None when a connection to it opens."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        _go_offline()
        return f"the hub at {host} is unreachable ({err.strerror or type(err).__name__})"
    return None


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by libraries imported from now on
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        try:
            setattr(__import__(module, fromlist=[attribute]), attribute, True)
        except ImportError:
            pass
