"""One device policy for every layer: ``auto`` is CUDA when present, else the CPU.

    resolve_device("auto" | None)  -> cuda if torch.cuda.is_available() else cpu
    "cuda" without an index         -> cuda:LOCAL_RANK under torchrun, else the current CUDA device
    resolve_device("cpu" | "cuda" | "cuda:N" | "meta" | torch.device) -> that device, checked

``meta`` is accepted so tests can run hot paths with shape-only tensors (a tensor made on another
device, or a value read into Python, then raises). A CUDA device that is not there is bad input,
reported in one line naming what is valid.
"""

from __future__ import annotations

import os
import re

import torch

from .errors import DeviceError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|meta|cuda(:\d+)?)$")
"""The device names this policy resolves and checks (anything else is refused here)."""


def resolve_device(spec: str | torch.device | None = "auto", *, what: str = "device") -> torch.device:
    """The ``torch.device`` that ``spec`` names (see the module docstring); ``what`` names the option in errors."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else str(spec).strip().lower()
    if not DEVICE_PATTERN.match(spec):
        raise DeviceError(f"{what} must be {DEVICE_CHOICES}, got {spec!r}")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{what} {spec} asked for, but this torch build sees no CUDA GPU; use cpu or auto")
        index = device.index if device.index is not None else _local_gpu()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{what} {spec} asked for, but only {torch.cuda.device_count()} CUDA device(s) are present "
                              f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
        device = torch.device("cuda", index)
    return device


def _local_gpu() -> int:
    """The GPU a process uses when none is named: under torchrun, its LOCAL_RANK (each rank its own
    GPU, made current so collectives and kernels land there); else the current device."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit() and int(local) < torch.cuda.device_count():
        torch.cuda.set_device(int(local))
        return int(local)
    return torch.cuda.current_device()


def autocast_default(device: torch.device) -> bool:
    """bf16 autocast of the encoder matmul is on by default on CUDA (tensor cores), off elsewhere."""
    return device.type == "cuda"
