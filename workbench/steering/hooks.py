"""Hook functions for each method, and ``steer``: the one context manager that installs them.

Each intervention acts on one hook's activation x (every position: the prompt and, with a KV cache,
each newly generated token, which arrives as a 1-position forward):

    add     x ← x + s·v     v = d̂_i = W_dec[i]/‖W_dec[i]‖            unit "raw"
                            v = σ_i · W_dec[i]/c                     unit "feature_max" / "feature_p99"
                                (σ_i: scales.py; c = the SAE's input scale, so v is what z_i = σ_i decodes to)
                            v = vector                               a raw vector (unit "raw")
    clamp   x ← x̂(z with z_i := a) + (x − x̂(z)),   z = encode(x),  a = s (raw) or s·σ_i
    ablate  clamp with a = 0
    code    codebook only; z = the k selected codes (each with weight b = 1, or 1/k for a "mean" codebook):
              replace_lowest  the forced code i replaces the lowest-scoring selected one (the set is kept
                              when i is already selected) and gets weight b·s
              replace_all     every one of the k slots holds code i (codebook-features' ``patch_in_codes``
                              with all code positions): z' = k·b·s·e_i, so x̂(z') = k·b·s·C_i/c and no
                              other code is active
            x ← x̂(z') + (x − x̂(z))

(choices) Every position is steered, BOS included, as docs/algorithms.md §7 says. The error term is always
added back, so ``clamp``/``ablate``/``code`` change x only along dictionary directions.

Hooks never synchronise with the host: no ``.item()``, no branching on tensor values (only on
shapes); constants live on the model's device, and new tensors are made from the activation.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.models import LoadedModel, model_device

from .scales import feature_scales
from .sources import SAERef, decoder_vectors, encoder, is_codebook, load_steering_sae
from .spec import Intervention, SteeringError, SteeringSpec

_RESID = re.compile(r"^(blocks\.\d+\.hook_resid_(pre|mid|post)|hook_embed)$")


class Resolved(NamedTuple):
    intervention: Intervention
    hook: str
    fn: Callable
    sae: torch.nn.Module | None
    direction: Tensor
    """(d,) the direction whose logit effect names the top tokens (decoder vector or raw vector)."""
    amount: float
    """add: the multiple of ``direction`` added; clamp: the latent value; code: the forced code's weight in z'."""
    label: str


def bridge_of(model):
    """Accept a ``LoadedModel`` or the ``TransformerBridge`` itself."""
    return model.model if isinstance(model, LoadedModel) else model


def check_spec(spec: SteeringSpec, ws=None) -> list[tuple[Intervention, SAERef | None, str | None]]:
    """Everything that can be checked without the model: SAEs load, indices in range, units usable."""
    if not isinstance(spec, SteeringSpec):
        raise SteeringError(f"expected a SteeringSpec, got {type(spec).__name__}")
    out = []
    for iv in spec.interventions:
        if iv.vector is not None:
            out.append((iv, None, iv.hook))
            continue
        ref = load_steering_sae(iv.source, ws)
        hook = iv.hook or ref.hook
        if hook is None:
            raise SteeringError(f"no hook for SAE '{iv.source}': give the intervention a hook (--hook)")
        if iv.hook and ref.hook and iv.hook != ref.hook:
            raise SteeringError(f"SAE '{ref.label}' was trained on '{ref.hook}', not '{iv.hook}'")
        width = ref.sae.cfg.width
        if iv.index >= width:
            raise SteeringError(f"feature {iv.index} out of range: SAE '{ref.label}' has {width} latents (0..{width - 1})")
        if iv.method == "code" and not is_codebook(ref.sae):
            raise SteeringError(f"method 'code' needs a codebook; SAE '{ref.label}' is {ref.sae.cfg.arch}")
        if iv.unit != "raw" and ws is None:
            raise SteeringError(f"unit {iv.unit!r} needs a workspace with cached activations (--db); without one use unit 'raw'")
        out.append((iv, ref, hook))
    return out


def resolve_spec(model, spec: SteeringSpec, ws=None) -> list[Resolved]:
    """Check the spec against the model and build one hook function per intervention."""
    from workbench.hooks import HookError, validate_hooks

    bridge = bridge_of(model)
    checked = check_spec(spec, ws)
    try:
        if checked:
            validate_hooks(bridge, [hook for _, _, hook in checked])
    except HookError as err:
        raise SteeringError(str(err)) from None
    device = model_device(bridge)
    resolved = []
    for iv, ref, hook in checked:
        if ref is not None:
            d_in = ref.sae.cfg.d_in
            if _RESID.match(hook) and d_in != bridge.cfg.d_model:
                raise SteeringError(f"SAE '{ref.label}' reads d={d_in} but '{hook}' has d_model={bridge.cfg.d_model}")
            ref.sae.to(device)
        elif _RESID.match(hook) and len(iv.vector) != bridge.cfg.d_model:
            raise SteeringError(f"vector has {len(iv.vector)} dimensions but '{hook}' has d_model={bridge.cfg.d_model}")
        resolved.append(_resolve_one(iv, ref, hook, ws, device))
    return resolved


def _scale(iv: Intervention, ref: SAERef, hook: str, ws) -> float:
    if iv.unit == "raw":
        return 1.0
    scale = float(feature_scales(ws, ref.sae, hook, iv.unit)[iv.index])  # host read at resolve time, not in a hook
    if scale <= 0:
        raise SteeringError(f"feature {iv.index} of '{ref.label}' never fires on the cached activations at '{hook}'; "
                            f"its {iv.unit} is 0 (use unit 'raw')")
    return scale


def _resolve_one(iv: Intervention, ref: SAERef | None, hook: str, ws, device: torch.device) -> Resolved:
    with torch.no_grad():
        if ref is None:
            vector = torch.tensor(iv.vector, dtype=torch.float32, device=device)  # (d,)
            return Resolved(iv, hook, _add_fn(iv.strength * vector, hook), None, vector, iv.strength, "vector")
        sae = ref.sae
        w_i = decoder_vectors(sae)[iv.index].detach().float().to(device)  # (d,)
        if iv.method == "add":
            if iv.unit == "raw":
                amount, direction = iv.strength, w_i / w_i.norm().clamp_min(1e-12)
            else:
                amount, direction = iv.strength * _scale(iv, ref, hook, ws), w_i
            fn = _add_fn(amount * direction, hook)
            return Resolved(iv, hook, fn, sae, direction, amount, ref.label)
        if iv.method in ("clamp", "ablate"):
            value = iv.strength * _scale(iv, ref, hook, ws)
            return Resolved(iv, hook, _clamp_fn(sae, iv.index, value, hook, device), sae, w_i, value, ref.label)
        weight = code_weight(sae, iv.strength, iv.code_mode)
        return Resolved(iv, hook, _code_fn(sae, iv.index, weight, hook, iv.code_mode), sae, w_i, weight, ref.label)


def code_weight(sae, strength: float, mode: str) -> float:
    """The forced code's entry in z': b·s (replace_lowest) or k·b·s (replace_all), b = 1 or 1/k ("mean")."""
    base = 1.0 / sae.cfg.k if sae.cfg.codebook_combine == "mean" else 1.0
    return base * strength * (sae.cfg.k if mode == "replace_all" else 1)


def _check_dim(act: Tensor, d: int, hook: str) -> None:
    if act.shape[-1] != d:  # a shape, not a tensor value: no host synchronisation
        raise SteeringError(f"'{hook}' has activations of shape {tuple(act.shape)}; the intervention needs last dimension {d}")


def _add_fn(delta: Tensor, hook_name: str) -> Callable:
    d = delta.shape[0]

    def add(act: Tensor, hook=None) -> Tensor:  # act: (batch, pos, d)
        _check_dim(act, d, hook_name)
        return act + delta.to(device=act.device, dtype=act.dtype)

    return add


def _clamp_fn(sae, index: int, value: float, hook_name: str, device: torch.device) -> Callable:
    encode, d = encoder(sae), sae.cfg.d_in
    index_t = torch.tensor([index], device=device)

    def clamp(act: Tensor, hook=None) -> Tensor:
        _check_dim(act, d, hook_name)
        x = act.reshape(-1, d)  # (N, d)
        z = encode(x)  # (N, F)
        error = x.float() - sae.decode(z).float()  # (N, d): what the SAE does not explain
        z_clamped = z.index_fill(1, index_t.to(z.device), value)  # (N, F), z_i := value
        out = sae.decode(z_clamped).float() + error  # (N, d)
        return out.to(act.dtype).reshape(act.shape)

    return clamp


def _code_fn(sae, index: int, weight: float, hook_name: str, mode: str = "replace_lowest") -> Callable:
    d, k, width = sae.cfg.d_in, sae.cfg.k, sae.cfg.width
    base = 1.0 / k if sae.cfg.codebook_combine == "mean" else 1.0
    codes = sae.codebook.detach()
    c_hat = codes / codes.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (N_codes, d)
    if mode not in ("replace_lowest", "replace_all"):
        raise SteeringError(f"unknown code_mode {mode!r}")

    def force(act: Tensor, hook=None) -> Tensor:
        _check_dim(act, d, hook_name)
        x = act.reshape(-1, d)  # (N, d)
        a = x.float() * sae.input_scale
        scores = F.layer_norm(a, (d,)) @ c_hat.t()  # (N, codes): the codebook's own ranking
        top = scores.topk(k, dim=1).indices  # (N, k), sorted: the last column is the lowest-scoring selected code
        z = torch.zeros(x.shape[0], width, dtype=a.dtype, device=a.device).scatter_(1, top, base)  # (N, codes)
        if mode == "replace_all":
            z_forced = torch.zeros_like(z)  # (N, codes): only code i, in all k slots
        else:
            already = (top == index).any(dim=1, keepdim=True).to(z.dtype)  # (N, 1)
            z_forced = z.clone().scatter_(1, top[:, -1:], already * base)  # drop the lowest unless i is selected
        z_forced[:, index] = weight
        out = x.float() + (sae.decode(z_forced) - sae.decode(z)).float()  # = x̂(z') + (x − x̂(z))
        return out.to(act.dtype).reshape(act.shape)

    return force


@contextmanager
def steer(model, spec: SteeringSpec, *, ws=None) -> Iterator[list[Resolved]]:
    """``with steer(model, spec): model.generate(...)`` — every forward inside is steered.

    Checks the whole spec first, then installs one hook per intervention through
    ``workbench.hooks.attached``, which removes them on exit, exceptions included.
    """
    bridge = bridge_of(model)
    resolved = resolve_spec(bridge, spec, ws)
    from workbench.hooks import attached

    with attached(bridge, [(r.hook, r.fn) for r in resolved]):
        yield resolved
