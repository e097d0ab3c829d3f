"""The single source of truth for architecture names.

CLI choices, test parametrisation and loading all read `architecture_names()` / `get_class()`.
A new variant is one module with `@register` on its class plus one import line at the bottom.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import UnknownArchitectureError

if TYPE_CHECKING:  # pragma: no cover
    from .config import SAEConfig

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    name = cls.arch
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"architecture {name!r} already registered")
    _REGISTRY[name] = cls
    return cls


def architecture_names(include_inference_only: bool = False) -> list[str]:
    """Registered names (trainable ones; add inference-only loaders such as jumprelu with the flag)."""
    return [n for n, c in _REGISTRY.items() if include_inference_only or getattr(c, "trainable", True)]


def check_architecture(name: Any) -> None:
    if name not in _REGISTRY:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; known: {', '.join(architecture_names(include_inference_only=True))}"
        )


def get_class(name: str) -> type:
    check_architecture(name)
    return _REGISTRY[name]


def build(cfg: "SAEConfig"):
    """Instantiate the module registered for cfg.arch."""
    return get_class(cfg.arch)(cfg)


def register_with_sae_lens() -> list[str]:
    """Make sae-lens able to load every architecture name this project may write.

    Saved SAEs already use sae-lens's own `topk` / `jumprelu` classes (the batch-dependent
    variants are saved in their threshold form). This additionally registers the project's
    threshold variants' names as aliases of sae-lens's JumpReLU classes, so a cfg.json whose
    `architecture` is e.g. "feature_choice" also loads with `sae_lens.SAE.load_from_disk`.
    Imports sae_lens (and thus transformer_lens) only when called. Returns the names added.
    """
    from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    added = []
    for name, cls in _REGISTRY.items():
        if getattr(cls, "sae_lens_architecture", None) == "jumprelu" and name not in SAE_CLASS_REGISTRY:
            register_sae_class(name, JumpReLUSAE, JumpReLUSAEConfig)
            added.append(name)
    return added


# --- registrations (one line per variant; this order is the order of architecture_names()) ------
# isort: off
from . import topk as _topk  # noqa: E402,F401
from . import batchtopk as _batchtopk  # noqa: E402,F401
from . import feature_choice as _feature_choice  # noqa: E402,F401
from . import codebook as _codebook  # noqa: E402,F401
from . import inference_only as _inference_only  # noqa: E402,F401
# isort: on
