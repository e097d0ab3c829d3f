"""Save / load in SAELens layout: `cfg.json` + `sae_weights.safetensors`.

Writing: the architecture is written explicitly. TopK is saved as sae-lens `topk`; the
batch-dependent variants in their inference (threshold) form as sae-lens `jumprelu` (θ broadcast
to (F,) for BatchTopK / Mutual Choice). The input scale s is folded into the weights so that
sae-lens, which sees `normalize_activations="none"`, gives the same feature activations on raw
inputs:  W_enc' = s W_enc,  b_dec' = b_dec / s,  W_dec' = W_dec / s.  The full project config
(every choice) is stored under the `saes_config` key with `norm_scaling_factor = s`, and
`load_sae` unfolds it (restoring unit-norm decoder rows). The codebook is written with
architecture "codebook" (no sae-lens equivalent).

Reading: project-written directories, and SAELens-layout `topk`, `jumprelu`, `standard` SAEs
(apply_b_dec_to_input=False and topk's rescale_acts_by_decoder_norm are folded in). How sae-lens
transforms inputs is honoured or refused, never ignored (`input_transform`):

    normalize_activations  "none" (or absent)          x as it is
                           "expected_average_only_in"  x · s with s = cfg.json's norm_scaling_factor,
                                                       folded: W_enc' = s W_enc, W_dec' = W_dec / s,
                                                       b_dec' = b_dec / s; refused when s is absent
                           "constant_norm_rescale", "layer_norm", "covariance_whitening"
                                                       refused: a per-token (or whitening) transform
                                                       that a dictionary of fixed weights cannot hold
    reshape_activations    "none" (or absent); "hook_z" refused
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import SAEConfig
from .errors import SAEConfigError, SAELoadError
from .registry import build, check_architecture

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
FORMAT_VERSION = 1
SAE_LENS_FORMAT_VERSION = "6.0.0"  # cfg layout version sae-lens >= 6 reads without conversion


def sae_lens_version() -> str:
    """The installed sae-lens's version (what its loader compares against), else the layout version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-lens")
    except PackageNotFoundError:
        return SAE_LENS_FORMAT_VERSION


def save_sae(sae: torch.nn.Module, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` to `directory` in SAELens layout; returns the directory. ``metadata`` joins cfg.json's
    `metadata` (what sae-lens and Neuronpedia key on: hook_name, model_name, context_size, prepend_bos,
    hook_head_index, dataset_path; the workspace supplies them when it trains)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg: SAEConfig = sae.cfg
    s = float(sae.input_scale)
    project = {
        "format_version": FORMAT_VERSION,
        "norm_scaling_factor": s,
        "threshold_updates": int(getattr(sae, "threshold_updates", torch.tensor(0))),
        **cfg.to_dict(),
    }
    if cfg.arch == "codebook":
        tensors = {"codebook": sae.codebook.detach().float().contiguous()}
        out_cfg: dict[str, Any] = {"architecture": "codebook", "d_in": cfg.d_in, "d_sae": cfg.width, "k": cfg.k}
    else:
        with torch.no_grad():
            tensors = {
                "W_enc": (sae.W_enc * s).float().contiguous(),  # (d, F)
                "b_enc": sae.b_enc.float().contiguous(),  # (F,)
                "W_dec": (sae.W_dec / s).float().contiguous(),  # (F, d)
                "b_dec": (sae.b_dec / s).float().contiguous(),  # (d,)
            }
            arch = sae.sae_lens_architecture
            if arch == "jumprelu":
                tensors["threshold"] = sae.threshold.float().expand(cfg.width).contiguous()  # (F,)
        out_cfg = {
            "architecture": arch,
            "d_in": cfg.d_in,
            "d_sae": cfg.width,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
        }
        if arch == "topk":
            out_cfg.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    out_cfg["metadata"] = {
        "sae_lens_version": sae_lens_version(),
        "sae_lens_training_version": sae_lens_version(),
        "training_architecture": cfg.arch,
        **(metadata or {}),
    }
    out_cfg["saes_config"] = project
    save_file(tensors, str(directory / WEIGHTS_FILENAME))
    (directory / CFG_FILENAME).write_text(json.dumps(out_cfg, indent=2, sort_keys=True))
    return directory


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_path, w_path = directory / CFG_FILENAME, directory / WEIGHTS_FILENAME
    if not cfg_path.is_file():
        raise SAELoadError(f"no {CFG_FILENAME} in {directory}")
    if not w_path.is_file():
        raise SAELoadError(f"no {WEIGHTS_FILENAME} in {directory}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAELoadError(f"corrupted {cfg_path}: {e}") from None
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SAELoadError(f"corrupted or truncated weights file {w_path}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(cfg, dict):
        raise SAELoadError(f"{cfg_path} is not a JSON object")
    return cfg, tensors


def _expect(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    if name not in tensors:
        raise SAELoadError(f"{path} lacks tensor {name!r}")
    t = tensors[name].float()
    if tuple(t.shape) != shape:
        raise SAELoadError(f"{path}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    if not torch.isfinite(t).all():
        raise SAELoadError(f"{path}: tensor {name} contains NaN or inf")
    return t


NORMALIZATIONS = ("none", "expected_average_only_in")
"""sae-lens `normalize_activations` values this loader honours (see the module docstring)."""


def input_transform(cfg: dict[str, Any], directory: Path) -> float:
    """The constant input scale s that a SAELens-layout cfg.json asks for (1.0 for "none"); a
    transform that fixed weights cannot reproduce raises SAELoadError naming what is valid."""
    reshape = cfg.get("reshape_activations") or "none"
    if reshape != "none":
        raise SAELoadError(f"{directory}: reshape_activations={reshape!r} is not supported (only 'none': the SAE must read "
                           "the hook's activations as they are)")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in NORMALIZATIONS:
        raise SAELoadError(f"{directory}: normalize_activations={norm!r} normalises each input on its own, which this "
                           f"workbench's SAEs cannot reproduce; supported: {', '.join(NORMALIZATIONS)}")
    if norm == "none":
        return 1.0
    s = cfg.get("norm_scaling_factor")
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not (math.isfinite(s) and s > 0):
        raise SAELoadError(f"{directory}: normalize_activations='expected_average_only_in' needs its norm_scaling_factor, "
                           "which cfg.json does not record; fold it into the weights with sae-lens "
                           "(fold_activation_norm_scaling_factor) and save again")
    return float(s)


def load_sae(directory: str | Path, expected_d_in: int | None = None) -> torch.nn.Module:
    """Load a project-saved or SAELens-layout (topk / jumprelu / standard) SAE, in eval mode."""
    directory = Path(directory)
    cfg, tensors = _read(directory)
    arch = cfg.get("architecture")
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise SAELoadError(f"{directory / CFG_FILENAME} lacks integer d_in / d_sae") from None
    if expected_d_in is not None and d_in != expected_d_in:
        raise SAELoadError(f"SAE in {directory} has d_in={d_in}, expected d_in={expected_d_in}")
    project = cfg.get("saes_config")
    scale = input_transform(cfg, directory)  # honoured or refused before anything is allocated
    try:
        if project is not None:
            sae_cfg = SAEConfig.from_dict(project)
        else:
            if arch not in ("topk", "jumprelu", "standard"):
                check_architecture(arch)  # raises with the list of names
                raise SAELoadError(f"cannot load SAELens architecture {arch!r} without saes_config")
            k = int(cfg.get("k", 1)) if arch == "topk" else 1
            sae_cfg = SAEConfig(d_in=d_in, width=d_sae, k=k, arch=arch, normalize_inputs=False)
    except SAEConfigError as e:
        raise SAELoadError(f"invalid config in {directory}: {e}") from None
    if (sae_cfg.d_in, sae_cfg.width) != (d_in, d_sae):
        raise SAELoadError(f"{directory}: saes_config (d_in={sae_cfg.d_in}, width={sae_cfg.width}) "
                           f"disagrees with d_in={d_in}, d_sae={d_sae}")
    wp = directory / WEIGHTS_FILENAME
    # Shapes first: the config alone must not make us allocate (a cfg.json can claim any width).
    expected = {"codebook": (d_sae, d_in)} if sae_cfg.arch == "codebook" else {
        "W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in expected.items():
        if name not in tensors:
            raise SAELoadError(f"{wp} lacks tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise SAELoadError(f"{wp}: tensor {name} has shape {tuple(tensors[name].shape)}, but {CFG_FILENAME} "
                               f"says d_in={d_in}, d_sae={d_sae} (expected {shape})")
    sae = build(sae_cfg)
    with torch.no_grad():
        if sae_cfg.arch == "codebook":
            sae.codebook.copy_(_expect(tensors, "codebook", (d_sae, d_in), wp))
            sae.input_scale.fill_(float(project.get("norm_scaling_factor", 1.0)))
            sae.ever_used.fill_(True)
            return sae.eval()
        W_enc = _expect(tensors, "W_enc", (d_in, d_sae), wp)
        b_enc = _expect(tensors, "b_enc", (d_sae,), wp)
        W_dec = _expect(tensors, "W_dec", (d_sae, d_in), wp)
        b_dec = _expect(tensors, "b_dec", (d_in,), wp)
        if project is not None:
            s = float(project.get("norm_scaling_factor", 1.0))
            if not (math.isfinite(s) and s > 0):
                raise SAELoadError(f"{directory}: invalid norm_scaling_factor {s}")
            W_enc, W_dec, b_dec = W_enc / s, W_dec * s, b_dec * s
            sae.input_scale.fill_(s)
        else:
            W_enc, W_dec, b_dec = W_enc * scale, W_dec / scale, b_dec / scale  # x·s folded in (1.0: unchanged)
            if not cfg.get("apply_b_dec_to_input", True):
                b_enc = b_enc + b_dec @ W_enc  # fold: x W + b = (x - b_dec) W + (b + b_dec W)
            if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
                n = W_dec.norm(dim=1)  # (F,)
                W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        if sae.threshold_kind is not None and (arch == "jumprelu"):
            th = _expect(tensors, "threshold", (d_sae,), wp)
            sae.threshold.copy_(th if sae.threshold.dim() == 1 else th[0])
            sae.threshold_updates.fill_(max(1, int((project or {}).get("threshold_updates", 1))))
    return sae.eval()
