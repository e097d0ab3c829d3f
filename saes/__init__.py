"""Sparse dictionaries for the workbench: SAE variants, codebook bottleneck, trainer, evals.

Consumes tensors only (never imports the language model, DuckDB or `workbench`).
"""

from . import evals
from .base import BaseSAE, ForwardOutput, Latents, Selection
from .config import SAEConfig, TrainConfig
from .devices import resolve_device
from .errors import CheckpointError, DeviceError, SAEConfigError, SAEError, SAELoadError, UnknownArchitectureError
from .io import load_sae, save_sae
from .registry import architecture_names, build, get_class, register_with_sae_lens
from .trainer import TrainResult, train

__all__ = [
    "SAEConfig", "TrainConfig", "architecture_names", "build", "get_class", "register_with_sae_lens",
    "BaseSAE", "ForwardOutput", "Latents", "Selection", "save_sae", "load_sae", "train", "TrainResult",
    "evals", "resolve_device", "DeviceError", "SAEError", "SAEConfigError", "SAELoadError", "UnknownArchitectureError", "CheckpointError",
]
