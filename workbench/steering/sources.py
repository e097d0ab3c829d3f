"""The dictionaries steering reads: SAEs and codebooks by workspace name or folder, their encoders.

A dictionary decodes z ∈ ℝ^F to x̂ = (z W_dec [+ b_dec]) / c (c: the input scale it was trained
with), so one unit of latent i adds w_i = W_dec[i] / c to the activation: ``decoder_vectors``.
``encoder`` is the batch-independent inference form z = encode(x), written without host reads so
it can run inside a hook on CUDA.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .spec import SteeringError


class SAERef(NamedTuple):
    sae: torch.nn.Module
    hook: str | None  # the hook it was trained on, when known
    label: str


_SAES: dict[tuple, torch.nn.Module] = {}
_ORIGIN: "weakref.WeakKeyDictionary[torch.nn.Module, Path]" = weakref.WeakKeyDictionary()  # module → its folder


def load_steering_sae(source: str, ws=None) -> SAERef:
    """A workspace SAE by name (or id), a registered ``saelens:`` spec, else an SAE folder; loaded
    once per folder version."""
    import saes
    from workbench.pretrained import is_spec, resolve_registered

    path, hook, label = None, None, str(source)
    if is_spec(source):  # saelens:RELEASE/SAE_ID: the SAE registered from it (eval registers)
        if ws is None:
            raise SteeringError(f"'{source}' names a pretrained SAE: register it with `workbench eval --db DB --sae {source}`, "
                                "then pass --db DB")
        record = resolve_registered(ws, source)
        label, hook, path = record.name, record.hook, record.path
    elif ws is not None:
        rows = ws.query(
            "SELECT name, hook, path FROM saes WHERE status = 'done' AND (name = ? OR CAST(sae_id AS VARCHAR) = ?)",
            [str(source), str(source)],
        )
        if rows:
            label, hook, path = rows[0][0], rows[0][1], Path(rows[0][2])
    if path is None:
        candidate = Path(source).expanduser()
        if (candidate / "cfg.json").is_file():
            path = candidate
            hook = _hook_from_cfg(candidate)
        else:
            if ws is not None:
                names = [n for (n,) in ws.query("SELECT name FROM saes WHERE status = 'done' ORDER BY sae_id")]
                listing = ", ".join(names[:12]) if names else "none trained yet"
                raise SteeringError(f"SAE '{source}' is neither a trained SAE in {ws.path.name} (available: {listing}) "
                                    "nor a folder with cfg.json")
            raise SteeringError(f"SAE '{source}' is not a folder with cfg.json (pass --db to use a workspace SAE name)")
    resolved = path.resolve()
    stamp = tuple(p.stat().st_mtime_ns for p in sorted(resolved.glob("*")) if p.is_file())
    key = (str(resolved), stamp)
    if key not in _SAES:
        try:
            _SAES[key] = saes.load_sae(resolved).eval().requires_grad_(False)
        except saes.SAEError as err:
            raise SteeringError(f"cannot load SAE '{source}': {err}") from None
        _ORIGIN[_SAES[key]] = resolved
    return SAERef(_SAES[key], hook, label)


def origin(sae: torch.nn.Module) -> Path | None:
    """The folder an SAE was loaded from by ``load_steering_sae`` (None for modules built elsewhere)."""
    return _ORIGIN.get(sae)


def _hook_from_cfg(directory: Path) -> str | None:
    try:
        cfg = json.loads((directory / "cfg.json").read_text())
    except (OSError, ValueError):
        return None
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    return hook if isinstance(hook, str) else None


def is_codebook(sae) -> bool:
    return getattr(sae.cfg, "arch", None) == "codebook"


def decoder_vectors(sae) -> Tensor:
    """What one unit of each latent adds to the activation, in the activation's space: (width, d)."""
    return sae.W_dec / sae.input_scale  # decode(z) = (z W_dec [+ b_dec]) / c, so ∂x̂/∂z_i = W_dec[i]/c


def encoder(sae) -> Callable[[Tensor], Tensor]:
    """(N, d) → (N, width) in the batch-independent inference form, free of host synchronisation.

    TopK and the codebook encode as ``sae.encode``; threshold variants are written out here because
    ``thresholds_ready`` reads a tensor into Python (evaluated once, now, instead of per call).
    """
    if is_codebook(sae) or sae.threshold_kind is None or not sae.thresholds_ready:
        return sae.encode
    threshold = sae.threshold

    def encode(x: Tensor) -> Tensor:
        pre = (x.to(sae.W_enc.dtype) * sae.input_scale - sae.b_dec) @ sae.W_enc + sae.b_enc  # (N, F)
        return pre.relu() * (pre > threshold.to(pre.dtype))

    return encode
