"""Where a command computes and in which precision the language model loads.

    device       auto | cpu | cuda | cuda:N       auto: CUDA when present, else the CPU
    model dtype  auto | float32 | bfloat16 | float16   auto: bfloat16 on CUDA, float32 elsewhere

The device policy itself is ``saes.resolve_device`` (the dictionaries sit below this package and
use it too). This module stays free of torch at import time, so the CLI can offer the choices
without loading it.
"""

from __future__ import annotations

MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(spec=None, *, what: str = "device"):
    """``saes.resolve_device``: a checked ``torch.device`` (None and "auto": CUDA when present)."""
    from saes.devices import resolve_device as resolve

    return resolve(spec, what=what)


def model_dtype(spec=None, device=None, *, what: str = "model dtype"):
    """The ``torch.dtype`` the language model loads in: ``spec`` (a name in ``MODEL_DTYPES`` or a
    torch dtype); None and "auto" give bfloat16 on CUDA and float32 elsewhere."""
    import torch

    from workbench.errors import WorkbenchError

    if isinstance(spec, torch.dtype):
        return spec
    spec = "auto" if spec is None else str(spec)
    if spec not in MODEL_DTYPES:
        raise WorkbenchError(f"{what} must be one of {', '.join(MODEL_DTYPES)}, got {spec!r}")
    if spec == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    return getattr(torch, spec)
