"""Hook names, their shapes, validation, and the one context manager that installs hooks.

Hook names are TransformerLens's (``blocks.{layer}.hook_resid_post``, ``blocks.{layer}.mlp.hook_post``,
...) as exposed by ``TransformerBridge.hook_dict``.
"""

from __future__ import annotations

import difflib
import re
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from workbench.errors import WorkbenchError

HookFn = Callable[[torch.Tensor, object], torch.Tensor | None]  # (activation, hook) -> replacement or None

_LAYER = re.compile(r"^blocks\.(\d+)\.")
_PROBE_LEN = 7  # sequence length of the probe forward; chosen not to collide with model dimensions


class HookError(WorkbenchError):
    """A hook name the model does not have."""


def hook_names(model) -> list[str]:
    return list(model.hook_dict)


def layer_of(hook: str) -> int | None:
    """Block index of a hook (``blocks.12.hook_resid_post`` → 12); None for embed / final hooks."""
    match = _LAYER.match(hook)
    return int(match.group(1)) if match else None


def validate_hooks(model, hooks: Sequence[str]) -> list[str]:
    """Return ``hooks`` unchanged, or raise ``HookError`` naming the closest valid names."""
    if not hooks:
        raise HookError("no hook given: pass --hook NAME (list them with `workbench hooks --model M`)")
    valid = model.hook_dict
    for hook in hooks:
        if hook not in valid:
            close = difflib.get_close_matches(hook, list(valid), n=3, cutoff=0.6)
            hint = f"closest: {', '.join(close)}" if close else "list them with `workbench hooks --model M`"
            raise HookError(f"unknown hook '{hook}' for this model; {hint}")
    return list(hooks)


def stop_layer(hooks: Sequence[str], n_layers: int) -> int | None:
    """The ``stop_at_layer`` that still runs every block the hooks need (None: run everything)."""
    layers = [layer_of(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None
    deepest = max(layers) + 1  # type: ignore[type-var]
    return deepest if deepest < n_layers else None


def end_after(model, hooks: Sequence[str]) -> list[tuple[str, HookFn]]:
    """Hooks that end a forward once ``hooks`` have run, for hooks in the model's last block, where
    ``stop_layer`` gives None: a hook on that block's ``hook_resid_post`` (its output, after every
    other hook in it; attach it after the hooks it must follow) raises the bridge's own
    stop-at-layer exception, so the final norm and the unembedding — the costliest matmul of a
    small model with a large vocabulary — never run. Empty when a hook is outside the blocks."""
    layers = [layer_of(h) for h in hooks]
    if not layers or any(layer is None for layer in layers) or max(layers) + 1 != model.cfg.n_layers:
        return []
    name = f"blocks.{max(layers)}.hook_resid_post"
    if name not in model.hook_dict:
        return []
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    def stop(activation: torch.Tensor, hook) -> None:
        raise StopAtLayerException(activation)

    return [(name, stop)]


class Capture:
    """Forward hooks that record the activation at each of ``names``: ``latest[name]`` holds the
    last one (detached, where it was computed); with ``keep_all`` every one is also kept as
    (tokens, d) float32 rows on the CPU, concatenated by ``rows(name)``. ``skip_first`` leaves out
    the first positions (BOS) of the kept rows. Use as ``attached(model, capture.hooks())``."""

    def __init__(self, names: Sequence[str], *, keep_all: bool = False, skip_first: int = 0):
        self.names = list(names)
        self.latest: dict[str, torch.Tensor] = {}
        self._rows: dict[str, list[torch.Tensor]] | None = {name: [] for name in self.names} if keep_all else None
        self.skip_first = skip_first

    def hooks(self) -> list[tuple[str, HookFn]]:
        def keep(name: str) -> HookFn:
            def fn(activation: torch.Tensor, hook=None) -> None:
                activation = activation.detach()
                self.latest[name] = activation
                if self._rows is not None:  # (b, T, d) -> (b·(T - skip_first), d)
                    kept = activation[:, self.skip_first:] if activation.dim() == 3 else activation
                    self._rows[name].append(kept.reshape(-1, activation.shape[-1]).float().cpu())

            return fn

        return [(name, keep(name)) for name in self.names]

    def rows(self, name: str) -> torch.Tensor:
        """Every kept activation of ``name``: (tokens, d) float32 on the CPU."""
        return torch.cat(self._rows[name])


@contextmanager
def attached(model, fwd_hooks: Sequence[tuple[str, HookFn]] | None = None) -> Iterator[None]:
    """Install forward hooks for the duration of the block; always removes them, even on error.

    Only the hooks this block added are removed, so blocks nest (e.g. steering inside a capture
    on the same hook point) without taking each other's hooks away.
    """
    added = []  # (hook point, the LensHandle this block added)
    try:
        for name, fn in fwd_hooks or ():
            point = model.hook_dict[name]
            before = {id(handle) for handle in point.fwd_hooks}
            point.add_hook(fn, dir="fwd")
            added.extend((point, handle) for handle in point.fwd_hooks if id(handle) not in before)
        yield
    finally:
        for point, handle in reversed(added):
            handle.hook.remove()
            point.fwd_hooks = [h for h in point.fwd_hooks if h is not handle]


def hook_shapes(model) -> dict[str, str]:
    """Every hook with its activation shape, e.g. ``[batch, pos, 576]``, from a 1×7 probe forward."""
    tokens = torch.zeros(1, _PROBE_LEN, dtype=torch.long, device=model.cfg.device)
    shapes: dict[str, str] = {}

    def record(name: str) -> HookFn:
        def fn(activation: torch.Tensor, hook) -> None:
            dims = ["batch" if i == 0 else "pos" if d == _PROBE_LEN else str(d) for i, d in enumerate(activation.shape)]
            shapes.setdefault(name, "[" + ", ".join(dims) + "]")

        return fn

    with torch.inference_mode(), attached(model, [(name, record(name)) for name in hook_names(model)]):
        model(tokens)
    return {name: shapes.get(name, "(not called in a forward)") for name in hook_names(model)}
