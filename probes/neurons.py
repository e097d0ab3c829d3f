"""Where a model's MLP neurons live: one `MLPSite` per layer.

An MLP (gated or plain) writes  FFN(x) = W_out · a (+ bias)  with the activation vector
a = σ(W_gate x) ⊙ (W_in x)  (gated) or  a = σ(W_in x)  (plain), so neuron i contributes
n_i = W_out[:, i] · a_i  and  ‖n_i‖ = |a_i| · ‖W_out[:, i]‖.

TransformerBridge names the input of every architecture's MLP output projection
``blocks.{L}.mlp.out.hook_in``; that hook carries a (batch, pos, d_mlp), and the projection's
weight gives the column norms ‖W_out[:, i]‖. A model whose blocks lack it (MoE experts,
unusual MLPs) is refused with the architecture's name.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from workbench.errors import WorkbenchError

ACTIVATION_HOOK = "blocks.{layer}.mlp.out.hook_in"


class NeuronSiteError(WorkbenchError):
    """The model has no per-neuron MLP activations where the sparsity probes look for them."""


class MLPSite(NamedTuple):
    layer: int
    hook: str  # carries a: (batch, pos, d_mlp)
    w_out: torch.Tensor  # (d_model, d_mlp), a view of the model's weight
    column_norms: torch.Tensor  # ‖W_out[:, i]‖: (d_mlp,), float32, on the model's device


def architecture_name(model) -> str:
    """The Hugging Face class behind a bridge (or the module's own class name)."""
    inner = getattr(model, "original_model", model)
    return type(inner).__name__


def activation_function(model) -> str:
    """The MLP nonlinearity from the HF config (``hidden_act`` / ``activation_function``)."""
    inner = getattr(model, "original_model", model)
    config = getattr(inner, "config", None)
    for field in ("hidden_act", "activation_function", "hidden_activation"):
        value = getattr(config, field, None)
        if isinstance(value, str):
            return value
    return "unknown"


def _output_weight(projection: torch.nn.Module, d_mlp: int) -> torch.Tensor:
    """W_out as (d_model, d_mlp): nn.Linear stores it that way, GPT-2's Conv1D transposed."""
    weight = getattr(projection, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError("no 2-D weight")
    if weight.shape[1] == d_mlp:
        return weight
    if weight.shape[0] == d_mlp:
        return weight.T
    raise ValueError(f"weight shape {tuple(weight.shape)} does not match d_mlp={d_mlp}")


def mlp_sites(model) -> list[MLPSite]:
    """One site per transformer block, in layer order."""
    blocks = getattr(model, "blocks", None)
    arch = architecture_name(model)
    where = "blocks.L.mlp.out (the MLP output projection whose input is the neuron activations)"
    if blocks is None or len(blocks) == 0:
        raise NeuronSiteError(f"{arch} is not wrapped as a TransformerBridge with blocks; load it with workbench.models.load_model")
    sites = []
    for layer, block in enumerate(blocks):
        mlp = getattr(block, "mlp", None)
        out = getattr(mlp, "out", None) if mlp is not None else None
        hook = ACTIVATION_HOOK.format(layer=layer)
        if out is None or hook not in model.hook_dict:
            found = sorted(n for n, _ in mlp.named_children() if not n.startswith(("hook_", "_"))) if mlp is not None else []
            raise NeuronSiteError(
                f"{arch} has no per-neuron MLP activations at {where} in block {layer} "
                f"(its MLP is {type(mlp).__name__} with: {', '.join(found) or 'no submodules'}); "
                "sparsity probes need a dense gated or plain MLP"
            )
        projection = getattr(out, "original_component", out)
        d_mlp = _d_mlp(mlp, projection)
        try:
            weight = _output_weight(projection, d_mlp)
        except ValueError as err:
            raise NeuronSiteError(f"{arch} block {layer}: cannot read W_out from {type(projection).__name__} ({err})") from None
        weight = weight.detach()
        sites.append(MLPSite(layer, hook, weight, weight.float().norm(dim=0)))  # norms: (d_mlp,)
    return sites


def _d_mlp(mlp, projection) -> int:
    for name in ("in", "gate"):
        branch = getattr(mlp, name, None)
        linear = getattr(branch, "original_component", branch)
        if linear is not None and hasattr(linear, "out_features"):
            return linear.out_features
    if hasattr(projection, "in_features"):
        return projection.in_features
    if hasattr(projection, "nf") and hasattr(projection, "weight"):  # GPT-2 Conv1D: weight (nx, nf)
        return projection.weight.shape[0]
    raise NeuronSiteError(f"cannot tell the MLP width of {type(projection).__name__}")
