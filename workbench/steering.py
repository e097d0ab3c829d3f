"""Steering: interventions on hook activations, scoped by one context manager (ALGORITHMS.md §7).

A steering spec is a list of interventions; each acts on one hook's activation x (every position:
the prompt and, with a KV cache, each newly generated token, which arrives as a 1-position forward):

    add     x ← x + s·v     v = d̂_i = W_dec[i]/‖W_dec[i]‖            unit "raw"
                            v = σ_i · W_dec[i]/c                     unit "feature_max" / "feature_p99":
                                σ_i = the feature's max or p99 activation over the workspace's cached
                                activations, c = the SAE's input scale (so v is what z_i = σ_i decodes to)
                            v = vector                               a raw vector (unit "raw")
    clamp   x ← x̂(z with z_i := a) + (x − x̂(z)),   z = encode(x),  a = s (raw) or s·σ_i
    ablate  clamp with a = 0
    code    codebook only: z = the k selected codes; the forced code i replaces the lowest-scoring
            selected one (the set is kept when i is already selected), its weight × s;
            x ← x̂(z') + (x − x̂(z))

(choices) Every position is steered, BOS included, as §7 says. The error term is always added back,
so ``clamp``/``ablate``/``code`` change x only along dictionary directions. σ_i's p99 is taken over
the tokens where feature i fires (z_i > 0): over all tokens it would be 0 for most sparse features.
Scales use BOS-free cached tokens (at most ``SCALE_TOKENS``, a seeded random subset beyond that) and
are cached in memory per (SAE module, workspace, hook).

Hooks never synchronise with the host: no ``.item()``, no branching on tensor values (only on
shapes); constants live on the model's device, and new tensors are made from the activation.

Measurement (``measure`` / ``sweep``), teacher-forced, one text per forward:
- feature activation: z_i of the SAE encoding of the hook's activation after every intervention on
  that hook, mean over prompt positions ≥ 1 (BOS is not what the SAE was trained on);
- top-token log-probability: log Σ_{t ∈ T} p(t) at every prompt position, T = the ``top_n`` tokens
  most promoted by the intervention's direction through the final norm's weight γ and the
  unembedding, (v ⊙ γ) W_Uᵀ (the norm's input-dependent scale left out, as in ``analysis.py``);
- side-effect cost: KL(baseline ‖ steered) of the next-token distributions on neutral text,
  nats per position, every position included.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.analysis import logit_effects
from workbench.errors import WorkbenchError

METHODS = ("add", "clamp", "ablate", "code")
UNITS = ("raw", "feature_max", "feature_p99")
SPEC_VERSION = 1
SCALE_TOKENS = 131_072  # cached tokens encoded for feature scales (a seeded random subset when more)
TOP_TOKENS = 10
MEASURE_TOKENS = 64  # texts are truncated to this many tokens (BOS included) in measure()
NEUTRAL_TEXTS = (  # fallback side-effect texts when no workspace is given (ordinary prose, no topic)
    "The meeting was moved to Thursday afternoon because several people were travelling.",
    "She opened the window, made a cup of tea and sat down to read the morning paper.",
    "Most libraries lend books for three weeks, and you can usually renew them online.",
    "The train left the station a few minutes late, but it arrived on time.",
)
_RESID = re.compile(r"^(blocks\.\d+\.hook_resid_(pre|mid|post)|hook_embed)$")


class SteeringError(WorkbenchError):
    """A steering spec, SAE, feature, hook or strength that cannot be applied (one line)."""


# -- the spec -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Intervention:
    """One intervention on one hook. Field docstrings are the JSON keys."""

    hook: str | None = None
    """Hook name (``blocks.15.hook_resid_post``); None: the workspace SAE's own hook."""
    source: str | None = None
    """SAE folder (SAELens layout) or the name of a trained SAE in the workspace; None for a raw vector."""
    index: int | None = None
    """Feature (latent) index, or the code index for ``code``."""
    vector: tuple[float, ...] | None = None
    """A raw direction for ``add`` instead of a feature (added as strength × vector)."""
    method: str = "add"
    """add, clamp, ablate or code."""
    strength: float = 1.0
    """add: multiple of the unit direction; clamp: the latent value (× scale in feature units); code: the forced code's weight; ablate: 0."""
    unit: str | None = None
    """raw, feature_max or feature_p99; None → feature_p99 for ``add`` of a feature, raw otherwise."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SteeringError(f"unknown steering method {self.method!r}; valid: {', '.join(METHODS)}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, numbers.Real):
            raise SteeringError(f"strength must be a number, got {self.strength!r}")
        if not math.isfinite(float(self.strength)):
            raise SteeringError(f"strength must be finite, got {self.strength}")
        object.__setattr__(self, "strength", 0.0 if self.method == "ablate" else float(self.strength))
        if self.index is not None:
            if isinstance(self.index, bool) or not isinstance(self.index, numbers.Integral) or self.index < 0:
                raise SteeringError(f"feature index must be a non-negative integer, got {self.index!r}")
            object.__setattr__(self, "index", int(self.index))
        if self.vector is not None:
            if self.method != "add":
                raise SteeringError(f"a raw vector works with method 'add' only, not {self.method!r}")
            if self.index is not None or self.source is not None:
                raise SteeringError("give either a raw vector or an SAE feature (source + index), not both")
            if not self.hook:
                raise SteeringError("a raw-vector intervention needs a hook")
            try:
                vec = tuple(float(v) for v in self.vector)
            except (TypeError, ValueError):
                raise SteeringError("vector must be a list of numbers") from None
            if not vec or not all(math.isfinite(v) for v in vec):
                raise SteeringError("vector must be a non-empty list of finite numbers")
            object.__setattr__(self, "vector", vec)
        else:
            if self.source is None or self.index is None:
                raise SteeringError(f"method {self.method!r} needs an SAE (source) and a feature index")
        unit = self.unit
        if unit is None:
            unit = "feature_p99" if self.method == "add" and self.vector is None else "raw"
        if unit not in UNITS:
            raise SteeringError(f"unknown strength unit {unit!r}; valid: {', '.join(UNITS)}")
        if unit != "raw" and (self.vector is not None or self.method in ("code", "ablate")):
            raise SteeringError(f"unit {unit!r} needs an SAE feature with add or clamp; use unit 'raw'")
        object.__setattr__(self, "unit", unit)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["vector"] is not None:
            d["vector"] = list(d["vector"])
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: object) -> "Intervention":
        if not isinstance(d, dict):
            raise SteeringError(f"each intervention must be a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SteeringError(f"unknown intervention field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        for key in ("hook", "source", "method", "unit"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise SteeringError(f"intervention field {key!r} must be a string, got {d[key]!r}")
        if d.get("vector") is not None and not isinstance(d["vector"], list):
            raise SteeringError("intervention field 'vector' must be a list of numbers")
        return cls(**d)

    def describe(self, hook: str | None = None) -> str:
        what = f"vector (dim {len(self.vector)})" if self.vector is not None else f"feature {self.index} of {self.source}"
        how = "" if self.method == "ablate" else f", strength {self.strength:g} ({self.unit})"
        return f"{self.method} {what} at {hook or self.hook or '(its SAE hook)'}{how}"


@dataclass(frozen=True)
class SteeringSpec:
    """Interventions applied together, in order (several on one hook chain in this order)."""

    interventions: tuple[Intervention, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "interventions", tuple(self.interventions))
        for iv in self.interventions:
            if not isinstance(iv, Intervention):
                raise SteeringError(f"a steering spec holds Intervention objects, got {type(iv).__name__}")

    @classmethod
    def single(cls, **fields) -> "SteeringSpec":
        return cls((Intervention(**fields),))

    def with_strength(self, strength: float) -> "SteeringSpec":
        """Every intervention at ``strength`` (ablate stays at 0)."""
        return SteeringSpec(tuple(replace(iv, strength=strength) for iv in self.interventions))

    def to_dict(self) -> dict:
        return {"version": SPEC_VERSION, "interventions": [iv.to_dict() for iv in self.interventions]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: object) -> "SteeringSpec":
        if isinstance(d, list):
            d = {"interventions": d}
        if not isinstance(d, dict) or not isinstance(d.get("interventions"), list):
            raise SteeringError('a steering spec is a JSON object {"version": 1, "interventions": [...]}')
        unknown = sorted(set(d) - {"version", "interventions"})
        if unknown:
            raise SteeringError(f"unknown steering spec field(s) {', '.join(unknown)}; valid: version, interventions")
        if d.get("version", SPEC_VERSION) != SPEC_VERSION:
            raise SteeringError(f"steering spec version {d.get('version')!r} is not supported (this workbench reads {SPEC_VERSION})")
        return cls(tuple(Intervention.from_dict(iv) for iv in d["interventions"]))

    @classmethod
    def from_json(cls, text: str) -> "SteeringSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SteeringError(f"malformed steering spec JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
        except TypeError:
            raise SteeringError(f"a steering spec is JSON text, got {type(text).__name__}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SteeringSpec":
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise SteeringError(f"cannot read steering spec {path}: {err.__class__.__name__}: {getattr(err, 'strerror', None) or err}") from None
        return cls.from_json(text)


# -- SAEs, encoders and feature scales -----------------------------------------------------
class SAERef(NamedTuple):
    sae: torch.nn.Module
    hook: str | None  # the hook it was trained on, when known
    label: str


_SAES: dict[tuple, torch.nn.Module] = {}
_SCALES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def load_steering_sae(source: str, ws=None) -> SAERef:
    """A workspace SAE by name (or id), else an SAE folder; loaded once per folder version."""
    import saes

    path, hook, label = None, None, str(source)
    if ws is not None:
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
                raise SteeringError(f"SAE '{source}' is neither a trained SAE in {ws.path.name} (available: {listing}) nor a folder with cfg.json")
            raise SteeringError(f"SAE '{source}' is not a folder with cfg.json (pass --db to use a workspace SAE name)")
    resolved = path.resolve()
    stamp = tuple(p.stat().st_mtime_ns for p in sorted(resolved.glob("*")) if p.is_file())
    key = (str(resolved), stamp)
    if key not in _SAES:
        try:
            _SAES[key] = saes.load_sae(resolved).eval().requires_grad_(False)
        except saes.SAEError as err:
            raise SteeringError(f"cannot load SAE '{source}': {err}") from None
    return SAERef(_SAES[key], hook, label)


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


class FeatureScales(NamedTuple):
    max: Tensor
    """(width,) largest activation of each feature."""
    p99: Tensor
    """(width,) 99th percentile of each feature's nonzero activations (linear interpolation)."""
    fired: Tensor
    """(width,) tokens on which the feature fired."""
    n_tokens: int


def feature_scales(ws, sae, hook: str, unit: str = "feature_p99", *, max_tokens: int = SCALE_TOKENS) -> Tensor:
    """(width,) each feature's observed activation scale at ``hook``: its max or p99 (where it fires)."""
    if unit not in ("feature_max", "feature_p99"):
        raise SteeringError(f"feature scales are 'feature_max' or 'feature_p99', got {unit!r}")
    stats = feature_scale_stats(ws, sae, hook, max_tokens=max_tokens)
    return stats.max if unit == "feature_max" else stats.p99


def feature_scale_stats(ws, sae, hook: str, *, max_tokens: int = SCALE_TOKENS) -> FeatureScales:
    """Encode (up to ``max_tokens`` of) the cached activations of ``hook``; cached in memory."""
    from workbench.activations import iter_activations
    from workbench.workspace import WorkspaceError

    per_sae = _SCALES.setdefault(sae, {})
    key = (str(ws.path), hook, max_tokens)
    if key in per_sae:
        return per_sae[key]
    encode = encoder(sae)
    device = decoder_vectors(sae).device
    values, features, n = [], [], 0
    try:
        batches = iter_activations(ws, hook, 4096, seed=0, split="all", epochs=1, drop_last=False)
        with torch.inference_mode():
            for batch in batches:
                batch = batch[: max_tokens - n]  # (B, d)
                if batch.shape[-1] != sae.cfg.d_in:
                    raise SteeringError(f"the SAE reads d={sae.cfg.d_in} but '{hook}' is cached with d={batch.shape[-1]}")
                z = encode(batch.to(device)).float()  # (B, F)
                rows, cols = z.nonzero(as_tuple=True)
                values.append(z[rows, cols].cpu())
                features.append(cols.cpu())
                n += batch.shape[0]
                if n >= max_tokens:
                    break
    except WorkspaceError as err:
        raise SteeringError(f"feature units need cached activations at '{hook}': {err}") from None
    width = sae.cfg.width
    vals, feats = torch.cat(values), torch.cat(features)  # (nnz,), (nnz,)
    vals, order = vals.sort(stable=True)
    feats, order2 = feats[order].sort(stable=True)  # grouped by feature, ascending values inside each group
    vals = vals[order2]
    counts = torch.bincount(feats, minlength=width)  # (F,)
    starts = counts.cumsum(0) - counts
    has = counts > 0
    last = (starts + counts - 1).clamp_min(0)
    pos = 0.99 * (counts - 1).clamp_min(0).double()
    lo, hi = pos.floor().long(), pos.ceil().long()
    zero = torch.zeros(width)
    if vals.numel():
        v_lo, v_hi = vals[(starts + lo).clamp(max=vals.numel() - 1)], vals[(starts + hi).clamp(max=vals.numel() - 1)]
        p99 = torch.where(has, v_lo + (pos - lo).float() * (v_hi - v_lo), zero)
        vmax = torch.where(has, vals[last.clamp(max=vals.numel() - 1)], zero)
    else:
        p99, vmax = zero, zero.clone()
    stats = FeatureScales(vmax, p99, counts, n)
    per_sae[key] = stats
    return stats


# -- resolving a spec into hook functions ----------------------------------------------------
class Resolved(NamedTuple):
    intervention: Intervention
    hook: str
    fn: Callable
    sae: torch.nn.Module | None
    direction: Tensor
    """(d,) the direction whose logit effect names the top tokens (decoder vector or raw vector)."""
    amount: float
    """add: the multiple of ``direction`` added; clamp: the latent value; code: the code weight."""
    label: str


def _bridge(model):
    """Accept a ``LoadedModel`` or the ``TransformerBridge`` itself."""
    from workbench.models import LoadedModel

    return model.model if isinstance(model, LoadedModel) else model


def _device(bridge) -> torch.device:
    return torch.device(bridge.cfg.device) if getattr(bridge.cfg, "device", None) is not None else torch.device("cpu")


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

    bridge = _bridge(model)
    checked = check_spec(spec, ws)
    try:
        if checked:
            validate_hooks(bridge, [hook for _, _, hook in checked])
    except HookError as err:
        raise SteeringError(str(err)) from None
    device = _device(bridge)
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
        raise SteeringError(f"feature {iv.index} of '{ref.label}' never fires on the cached activations at '{hook}'; its {iv.unit} is 0 (use unit 'raw')")
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
        weight = (1.0 / sae.cfg.k if sae.cfg.codebook_combine == "mean" else 1.0) * iv.strength
        return Resolved(iv, hook, _code_fn(sae, iv.index, weight, hook), sae, w_i, weight, ref.label)


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


def _code_fn(sae, index: int, weight: float, hook_name: str) -> Callable:
    d, k, width = sae.cfg.d_in, sae.cfg.k, sae.cfg.width
    base = 1.0 / k if sae.cfg.codebook_combine == "mean" else 1.0
    codes = sae.codebook.detach()
    c_hat = codes / codes.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (N_codes, d)

    def force(act: Tensor, hook=None) -> Tensor:
        _check_dim(act, d, hook_name)
        x = act.reshape(-1, d)  # (N, d)
        a = x.float() * sae.input_scale
        scores = F.layer_norm(a, (d,)) @ c_hat.t()  # (N, codes): the codebook's own ranking
        top = scores.topk(k, dim=1).indices  # (N, k), sorted: the last column is the lowest-scoring selected code
        z = torch.zeros(x.shape[0], width, dtype=a.dtype, device=a.device).scatter_(1, top, base)  # (N, codes)
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
    bridge = _bridge(model)
    resolved = resolve_spec(bridge, spec, ws)
    from workbench.hooks import attached

    with attached(bridge, [(r.hook, r.fn) for r in resolved]):
        yield resolved


# -- generation ------------------------------------------------------------------------------
class Generation(NamedTuple):
    prompt: str
    baseline: str
    steered: str
    baseline_tokens: list[int]
    steered_tokens: list[int]


def generate_tokens(model, tokens: Tensor, *, max_new_tokens: int = 40, seed: int = 0, temperature: float = 0.7,
                    top_p: float | None = None, use_past_kv_cache: bool = True, stop_at_eos: bool = True) -> Tensor:
    """New token ids (n,) after ``tokens`` (1, L); temperature 0 is greedy; the RNG is seeded and restored."""
    bridge = _bridge(model)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise SteeringError(f"temperature must be ≥ 0, got {temperature}")
    if max_new_tokens <= 0:
        raise SteeringError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    device = _device(bridge)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = bridge.generate(
            tokens, max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
            top_p=top_p, stop_at_eos=stop_at_eos, use_past_kv_cache=use_past_kv_cache, return_type="tokens", verbose=False,
        )  # (1, L + n)
    return out[0, tokens.shape[1]:]


def generate(model, prompt: str, spec: SteeringSpec, *, max_new_tokens: int = 40, seed: int = 0, temperature: float = 0.7,
             top_p: float | None = None, ws=None, use_past_kv_cache: bool = True) -> Generation:
    """Baseline and steered continuations of ``prompt`` with the same sampling seed."""
    bridge = _bridge(model)
    resolve_spec(bridge, spec, ws)  # fail before spending time on the baseline
    tokens = bridge.to_tokens(prompt)  # (1, L), BOS prepended
    kwargs = dict(max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p, use_past_kv_cache=use_past_kv_cache)
    base = generate_tokens(bridge, tokens, **kwargs)
    with steer(bridge, spec, ws=ws):
        steered = generate_tokens(bridge, tokens, **kwargs)
    decode = bridge.tokenizer.decode
    return Generation(prompt, decode(base, skip_special_tokens=True), decode(steered, skip_special_tokens=True),
                      base.tolist(), steered.tolist())


# -- measurement --------------------------------------------------------------------------------
def logit_effect(model, direction: Tensor) -> Tensor:
    """(vocab,) direct logit effect (v ⊙ γ) W_Uᵀ of a direction; γ = the final norm's weight."""
    return logit_effects(direction[None], _bridge(model))[0]


def top_tokens(model, direction: Tensor, n: int = TOP_TOKENS) -> list[int]:
    """The ``n`` tokens the direction promotes most."""
    return logit_effect(model, direction).topk(n).indices.tolist()


def _as_tokens(bridge, text: str | Tensor, max_tokens: int) -> Tensor:
    if isinstance(text, Tensor):
        tokens = text.reshape(1, -1).to(_device(bridge))
    else:
        tokens = bridge.to_tokens(text)  # (1, L)
    return tokens[:, :max_tokens]


def _run(bridge, tokens: Tensor, hooks: list, captures: dict, capture_hooks: Sequence[str]) -> Tensor:
    from workbench.hooks import attached

    def capture(name: str):
        def fn(act: Tensor, hook=None) -> None:
            captures[name] = act.detach()[0].float()  # (L, d) after every intervention on this hook

        return fn

    with torch.inference_mode(), attached(bridge, [*hooks, *((h, capture(h)) for h in capture_hooks)]):
        return bridge(tokens)[0].float().log_softmax(-1)  # (L, vocab)


def measure(model, spec: SteeringSpec, prompts: Sequence[str | Tensor], neutral_texts: Sequence[str | Tensor] | None = None, *,
            ws=None, top_n: int = TOP_TOKENS, max_tokens: int = MEASURE_TOKENS, _baseline: dict | None = None) -> dict:
    """Teacher-forced effect of ``spec``: feature activation, top-token log-probability, KL on neutral text.

    Returns ``kl_neutral`` and, for the first intervention, ``feature_act_baseline``,
    ``feature_act_steered``, ``logprob_top_baseline``, ``logprob_top_steered``,
    ``delta_logprob_top`` and ``top_tokens``; ``interventions`` has the same keys for each one.
    """
    bridge = _bridge(model)
    if not prompts:
        raise SteeringError("measure needs at least one prompt")
    neutral_texts = NEUTRAL_TEXTS if neutral_texts is None else neutral_texts
    resolved = resolve_spec(bridge, spec, ws)
    hooks = [(r.hook, r.fn) for r in resolved]
    capture_hooks = sorted({r.hook for r in resolved if r.sae is not None})
    baseline = {} if _baseline is None else _baseline
    tops = [top_tokens(bridge, r.direction, top_n) for r in resolved]

    def baseline_run(kind: str, i: int, tokens: Tensor) -> tuple[Tensor, dict]:
        key = (kind, i, tuple(tokens[0].tolist()))
        entry = baseline.get(key)
        if entry is None or not set(capture_hooks) <= entry[1].keys():
            caps: dict = {}
            entry = (_run(bridge, tokens, [], caps, capture_hooks), caps)
            baseline[key] = entry
        return entry

    acts = [[[], []] for _ in resolved]  # per intervention: baseline / steered feature values
    logp = [[[], []] for _ in resolved]
    for i, prompt in enumerate(prompts):
        tokens = _as_tokens(bridge, prompt, max_tokens)
        base_logp, base_caps = baseline_run("prompt", i, tokens)
        caps: dict = {}
        steer_logp = _run(bridge, tokens, hooks, caps, capture_hooks)
        for j, r in enumerate(resolved):
            top = torch.tensor(tops[j], device=base_logp.device)
            logp[j][0].append(base_logp[:, top].logsumexp(-1))  # (L,)
            logp[j][1].append(steer_logp[:, top].logsumexp(-1))
            if r.sae is not None and tokens.shape[1] > 1:
                enc = encoder(r.sae)
                with torch.inference_mode():
                    acts[j][0].append(enc(base_caps[r.hook][1:])[:, r.intervention.index].float())  # (L-1,)
                    acts[j][1].append(enc(caps[r.hook][1:])[:, r.intervention.index].float())
    kls = []
    for i, text in enumerate(neutral_texts):
        tokens = _as_tokens(bridge, text, max_tokens)
        base_logp, _ = baseline_run("neutral", i, tokens)
        steer_logp = _run(bridge, tokens, hooks, {}, ())
        kls.append((base_logp.exp() * (base_logp - steer_logp)).sum(-1))  # (L,)

    def mean(parts: list) -> float:
        return float(torch.cat(parts).mean()) if parts else float("nan")

    decode = bridge.tokenizer.decode
    rows = []
    for j, r in enumerate(resolved):
        row = {
            "method": r.intervention.method, "hook": r.hook, "source": r.label, "index": r.intervention.index,
            "strength": r.intervention.strength, "unit": r.intervention.unit, "amount": r.amount,
            "feature_act_baseline": mean(acts[j][0]), "feature_act_steered": mean(acts[j][1]),
            "logprob_top_baseline": mean(logp[j][0]), "logprob_top_steered": mean(logp[j][1]),
            "top_tokens": [decode([t]) for t in tops[j]],
        }
        row["delta_logprob_top"] = row["logprob_top_steered"] - row["logprob_top_baseline"]
        rows.append(row)
    result = {"kl_neutral": mean(kls), "n_neutral_positions": sum(k.numel() for k in kls), "interventions": rows}
    if rows:
        result.update({k: rows[0][k] for k in ("feature_act_baseline", "feature_act_steered", "logprob_top_baseline",
                                                "logprob_top_steered", "delta_logprob_top", "top_tokens")})
    return result


class SweepRow(NamedTuple):
    strength: float
    metrics: dict


def sweep(model, spec: SteeringSpec | Callable[[float], SteeringSpec], strengths: Iterable[float],
          prompts: Sequence[str | Tensor], neutral_texts: Sequence[str | Tensor] | None = None, *, ws=None, **kwargs) -> list[SweepRow]:
    """``measure`` at each strength (a spec's interventions all take the strength, or ``spec(strength)``)."""
    factory = spec.with_strength if isinstance(spec, SteeringSpec) else spec
    baseline: dict = {}  # unsteered forwards are shared by every strength
    return [SweepRow(float(s), measure(model, factory(s), prompts, neutral_texts, ws=ws, _baseline=baseline, **kwargs))
            for s in strengths]


# -- the `workbench steer` command ------------------------------------------------------------
def neutral_from_workspace(ws, hook: str, n: int = 4, max_tokens: int = MEASURE_TOKENS) -> list[Tensor]:
    """Token ids of up to ``n`` held-out contexts cached at ``hook`` (real corpus text)."""
    from workbench.training import held_out_tokens

    run_id = ws.resolve_hook_run(hook)
    tokens = held_out_tokens(ws, hook, run_id, limit=n)  # (n, L)
    return [row[:max_tokens] for row in tokens]


def spec_from_args(args) -> SteeringSpec:
    """The spec of ``workbench steer``: ``--spec FILE`` or one intervention from the flags."""
    if args.spec is not None:
        return SteeringSpec.load(args.spec)
    if args.sae is None or args.feature is None:
        raise SteeringError("give --sae and --feature (or a --spec file)")
    return SteeringSpec.single(hook=args.hook, source=args.sae, index=args.feature, method=args.method,
                               strength=args.strength, unit=args.unit)


def run_steer_command(args) -> None:
    """``workbench steer``: check the spec, load the model, print both generations and the effect."""
    from workbench.models import load_model
    from workbench.workspace import Workspace

    spec = spec_from_args(args)
    if not spec.interventions:
        raise SteeringError("the steering spec has no interventions")
    if args.max_new_tokens <= 0:
        raise SteeringError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    ws = Workspace(args.db, read_only=True) if args.db is not None else None
    try:
        checked = check_spec(spec, ws)  # SAEs, indices, units: before the model loads
        hook = checked[0][2]
        model_name = args.model
        if model_name is None and ws is not None:
            rows = ws.query("SELECT r.model FROM runs r JOIN run_hooks h USING (run_id) WHERE h.hook = ? ORDER BY r.run_id", [hook])
            model_name = rows[0][0] if rows else None
        loaded = load_model(model_name or "smollm2-135m", device=args.device)
        gen = generate(loaded.model, args.prompt, spec, max_new_tokens=args.max_new_tokens, seed=args.seed,
                       temperature=args.temperature, ws=ws)
        neutral = None
        if ws is not None:
            try:
                neutral = neutral_from_workspace(ws, hook)
            except WorkbenchError:
                neutral = None
        effect = measure(loaded.model, spec, [args.prompt], neutral, ws=ws)
    finally:
        if ws is not None:
            ws.close()
    print(format_report(spec, gen, effect, temperature=args.temperature, seed=args.seed))


def format_report(spec: SteeringSpec, gen: Generation, effect: dict, *, temperature: float, seed: int) -> str:
    sampling = "greedy" if temperature == 0 else f"temperature {temperature:g}, seed {seed}"
    hooks = [row["hook"] for row in effect["interventions"]]
    lines = [f"steering ({sampling}):"] + [f"  {iv.describe(hook)}" for iv, hook in zip(spec.interventions, hooks)]
    lines += [f"prompt:   {gen.prompt!r}", f"baseline: {gen.baseline!r}", f"steered:  {gen.steered!r}",
              "effect on the prompt (teacher-forced, baseline → steered):"]
    for row in effect["interventions"]:
        name = f"feature {row['index']}" if row["index"] is not None else "vector"
        if row["source"] != "vector":
            lines.append(f"  {name} activation at {row['hook']}: {row['feature_act_baseline']:.3f} → {row['feature_act_steered']:.3f}")
        tokens = ", ".join(repr(t) for t in row["top_tokens"])
        lines.append(f"  log P(top tokens of {name}): {row['logprob_top_baseline']:.3f} → {row['logprob_top_steered']:.3f} "
                     f"(Δ {row['delta_logprob_top']:+.3f}); tokens: {tokens}")
    lines.append(f"side effect: KL(baseline ‖ steered) on neutral text = {effect['kl_neutral']:.4f} nats/token "
                 f"({effect['n_neutral_positions']} positions)")
    return "\n".join(lines)
