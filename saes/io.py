"""Save / load in SAELens layout (`cfg.json` + `sae_weights.safetensors`) and sparsify's (`cfg.json` + `sae.safetensors`).

Writing: the architecture is written explicitly. TopK is saved as sae-lens `topk`; the
batch-dependent variants in their inference (threshold) form as sae-lens `jumprelu` (θ broadcast
to (F,) for BatchTopK / Mutual Choice). The input scale s is folded into the weights so that
sae-lens, which sees `normalize_activations="none"`, gives the same feature activations on raw
inputs:  W_enc' = s W_enc,  b_dec' = b_dec / s,  W_dec' = W_dec / s.  The full project config
(every choice) is stored under the `saes_config` key with `norm_scaling_factor = s`, and
`load_sae` unfolds it (restoring unit-norm decoder rows). The codebook is written with
architecture "codebook" (no sae-lens equivalent) and the keys every sae-lens config reads
(dtype, device, normalize_activations with its norm_scaling_factor s, reshape_activations), so
sae-lens stops at the architecture lookup: `KeyError: 'codebook'`. `save_sparsify` writes a TopK
SAE for sparsify (the inverse of the mapping below, s folded in as above).

`save_sparsity` writes `sparsity.safetensors` (tensor "sparsity", (F,)) as sae-lens releases carry
it: log10(density + 1e-10), sae-lens's floor, so a dead latent reads -10 (`sparsity_from_density`).

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

sparsify (EleutherAI) folders, cfg.json + sae.safetensors (one such folder per hookpoint in a
release; a folder of them is refused with the list), load as the project's TopK SAE (`load_sparsify`):

    W_enc = encoder.weightᵀ (d, F),  b_enc = encoder.bias,  W_dec = W_dec (F, d),  b_dec = b_dec,  s = 1
    activation "topk"; normalize_decoder and multi_topk (training only) honoured
    activation "groupmax", transcode, skip_connection (or a W_skip tensor), unknown options: refused
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import SAEConfig
from .errors import SAEConfigError, SAEError, SAELoadError, UnknownArchitectureError
from .registry import architecture_names, build

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
DENSITY_FLOOR = 1e-10  # sae-lens writes log10(density + 1e-10): a latent that never fired reads -10
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
        tensors = {"codebook": sae.codebook.detach().float().contiguous()}  # (N, d), in the scaled space a = s·x
        out_cfg: dict[str, Any] = {"architecture": "codebook", "d_in": cfg.d_in, "d_sae": cfg.width, "k": cfg.k,
                                   **_common_keys(s)}
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
        out_cfg = {"architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.width, **_common_keys(1.0), "apply_b_dec_to_input": True}
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


def _common_keys(scale: float) -> dict[str, Any]:
    """The cfg.json keys every sae-lens config reads before it looks at the architecture. ``scale``: the input
    scale s the weights still expect (1.0 when it is folded in, as for every SAE; the codebook keeps its s)."""
    keys: dict[str, Any] = {"dtype": "float32", "device": "cpu", "reshape_activations": "none",
                            "normalize_activations": "none" if scale == 1.0 else "expected_average_only_in"}
    if scale != 1.0:
        keys["norm_scaling_factor"] = scale
    return keys


def _hookpoint_folders(directory: Path) -> list[str]:
    """Subfolders holding an SAE (sparsify and sae-lens releases keep one folder per hookpoint)."""
    try:
        return sorted(p.name for p in directory.iterdir() if p.is_dir() and (p / CFG_FILENAME).is_file())
    except OSError:
        return []


def _read(directory: Path, weights: str = WEIGHTS_FILENAME) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_path, w_path = directory / CFG_FILENAME, directory / weights
    if not cfg_path.is_file():
        nested = _hookpoint_folders(directory) if directory.is_dir() else []
        if nested:
            shown = ", ".join(nested[:8]) + (f" (+{len(nested) - 8} more)" if len(nested) > 8 else "")
            raise SAELoadError(f"no {CFG_FILENAME} in {directory}: it holds one SAE per subfolder ({shown}); pass one of them")
        raise SAELoadError(f"no {CFG_FILENAME} in {directory}")
    if not w_path.is_file():
        raise SAELoadError(f"no {weights} in {directory} (SAELens layout: {WEIGHTS_FILENAME}; sparsify: {SPARSIFY_WEIGHTS_FILENAME})")
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


SAE_LENS_ARCHITECTURES = ("topk", "jumprelu", "standard")
"""sae-lens `architecture` values that load without the project's saes_config."""

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


def _check_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], wp: Path, claim: str) -> None:
    """Shapes first: the config alone must not make us allocate (a cfg.json can claim any width)."""
    for name, shape in expected.items():
        if name not in tensors:
            raise SAELoadError(f"{wp} lacks tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise SAELoadError(f"{wp}: tensor {name} has shape {tuple(tensors[name].shape)}, but {CFG_FILENAME} "
                               f"says {claim} (expected {shape})")


def is_sparsify_layout(directory: str | Path) -> bool:
    """A folder as sparsify's `SparseCoder.save_to_disk` writes it: cfg.json + sae.safetensors (and no SAELens weights)."""
    directory = Path(directory)
    return ((directory / CFG_FILENAME).is_file() and (directory / SPARSIFY_WEIGHTS_FILENAME).is_file()
            and not (directory / WEIGHTS_FILENAME).is_file())


def load_sae(directory: str | Path, expected_d_in: int | None = None) -> torch.nn.Module:
    """Load a project-saved, SAELens-layout (topk / jumprelu / standard) or sparsify SAE, in eval mode."""
    directory = Path(directory)
    if is_sparsify_layout(directory):
        return load_sparsify(directory, expected_d_in)
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
            if not isinstance(project, dict):
                raise SAELoadError(f"{directory / CFG_FILENAME}: saes_config must be a JSON object, got {type(project).__name__}")
            sae_cfg = SAEConfig.from_dict(project)
        else:
            if arch not in SAE_LENS_ARCHITECTURES:
                raise SAELoadError(f"{directory}: cannot load architecture {arch!r} without the project's saes_config; "
                                   f"supported: SAELens {', '.join(SAE_LENS_ARCHITECTURES)}; project-written "
                                   f"{', '.join(architecture_names())}; sparsify folders ({SPARSIFY_WEIGHTS_FILENAME})")
            k = int(cfg.get("k", 1)) if arch == "topk" else 1
            sae_cfg = SAEConfig(d_in=d_in, width=d_sae, k=k, arch=arch, normalize_inputs=False)
    except (SAEConfigError, UnknownArchitectureError, TypeError) as e:
        raise SAELoadError(f"invalid config in {directory}: {e}") from None
    if (sae_cfg.d_in, sae_cfg.width) != (d_in, d_sae):
        raise SAELoadError(f"{directory}: saes_config (d_in={sae_cfg.d_in}, width={sae_cfg.width}) "
                           f"disagrees with d_in={d_in}, d_sae={d_sae}")
    wp = directory / WEIGHTS_FILENAME
    expected = {"codebook": (d_sae, d_in)} if sae_cfg.arch == "codebook" else {
        "W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    _check_shapes(tensors, expected, wp, f"d_in={d_in}, d_sae={d_sae}")
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


# ----------------------------------------------------------------------------- sparsify
SPARSIFY_KEYS = ("d_in", "k", "num_latents", "expansion_factor", "activation", "normalize_decoder", "multi_topk",
                 "skip_connection", "transcode")
"""sparsify cfg.json fields `load_sparsify` knows; any other field set to a true value is refused."""


def _non_negative_int(cfg: dict[str, Any], name: str, directory: Path, default: int | None = None) -> int:
    v = cfg.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise SAELoadError(f"{directory / CFG_FILENAME}: sparsify field {name} must be a non-negative integer, got {v!r}")
    return v


def sparsify_shape(cfg: dict[str, Any], directory: Path) -> tuple[int, int, int]:
    """(d_in, F, k) of a sparsify cfg.json; what the project's TopK SAE cannot reproduce raises SAELoadError.

    Honoured: activation "topk"; normalize_decoder (training only: it keeps decoder rows unit norm);
    multi_topk (training only: an extra loss on the 4k largest latents; encode and decode use k).
    Refused: activation "groupmax" (one winner per group of F/k latents), transcode (predicts another
    module's output, and encodes x without subtracting b_dec), skip_connection (x̂ += x W_skipᵀ).
    """
    unknown = sorted(key for key, value in cfg.items() if key not in SPARSIFY_KEYS and value)
    if unknown:
        raise SAELoadError(f"{directory}: sparsify option(s) {', '.join(f'{u}={cfg[u]!r}' for u in unknown)} not known to this "
                           f"loader; it reads: {', '.join(SPARSIFY_KEYS)}")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SAELoadError(f"{directory}: sparsify activation={activation!r} is not supported (only 'topk': the k largest "
                           "latents per token)")
    if cfg.get("transcode"):
        raise SAELoadError(f"{directory}: a sparsify transcoder (transcode=true) predicts another module's output; only "
                           "autoencoders (transcode=false) load")
    if cfg.get("skip_connection"):
        raise SAELoadError(f"{directory}: sparsify skip_connection=true adds x W_skip to the reconstruction, which this "
                           "workbench's SAEs do not have; only skip_connection=false loads")
    d_in = _non_negative_int(cfg, "d_in", directory)
    width = _non_negative_int(cfg, "num_latents", directory, 0) or d_in * _non_negative_int(cfg, "expansion_factor", directory, 32)
    return d_in, width, _non_negative_int(cfg, "k", directory, 32)


def load_sparsify(directory: str | Path, expected_d_in: int | None = None) -> torch.nn.Module:
    """Load a sparsify (EleutherAI) TopK SAE folder (cfg.json + sae.safetensors) as the project's TopK SAE, in eval mode.

    sparsify encodes z = topk_k(ReLU((x - b_dec) Eᵀ + e)) and decodes x̂ = z W_dec + b_dec, with E = encoder.weight (F, d),
    e = encoder.bias (F,), W_dec (F, d), b_dec (d,). The project's TopK SAE computes the same with
        W_enc = Eᵀ (d, F),  b_enc = e,  W_dec = W_dec,  b_dec = b_dec,  s = 1  (no input scaling).
    The weights are read in float32 whatever dtype they were saved in.
    """
    directory = Path(directory)
    cfg, tensors = _read(directory, SPARSIFY_WEIGHTS_FILENAME)
    d_in, width, k = sparsify_shape(cfg, directory)
    if expected_d_in is not None and d_in != expected_d_in:
        raise SAELoadError(f"SAE in {directory} has d_in={d_in}, expected d_in={expected_d_in}")
    wp = directory / SPARSIFY_WEIGHTS_FILENAME
    if "W_skip" in tensors:
        raise SAELoadError(f"{wp} holds a skip connection W_skip, which this workbench's SAEs do not have")
    _check_shapes(tensors, {"encoder.weight": (width, d_in), "encoder.bias": (width,), "W_dec": (width, d_in), "b_dec": (d_in,)},
                  wp, f"d_in={d_in}, num_latents={width}")
    try:
        sae_cfg = SAEConfig(d_in=d_in, width=width, k=k, arch="topk", normalize_inputs=False)
    except SAEConfigError as e:
        raise SAELoadError(f"invalid sparsify config in {directory}: {e}") from None
    sae = build(sae_cfg)
    with torch.no_grad():
        sae.W_enc.copy_(_expect(tensors, "encoder.weight", (width, d_in), wp).t())  # (d, F)
        sae.b_enc.copy_(_expect(tensors, "encoder.bias", (width,), wp))  # (F,)
        sae.W_dec.copy_(_expect(tensors, "W_dec", (width, d_in), wp))  # (F, d)
        sae.b_dec.copy_(_expect(tensors, "b_dec", (d_in,), wp))  # (d,)
        sae.input_scale.fill_(1.0)
    return sae.eval()


def save_sparsify(sae: torch.nn.Module, directory: str | Path) -> Path:
    """Write a TopK SAE as sparsify's `SparseCoder.load_from_disk` reads it (cfg.json + sae.safetensors); returns the folder.

    The inverse of `load_sparsify`, with the input scale s folded in as in `save_sae`:
        encoder.weight = (s W_enc)ᵀ (F, d),  encoder.bias = b_enc,  W_dec = W_dec / s,  b_dec = b_dec / s.
    Only "topk": the batch-level variants infer with a threshold, which sparsify has no form for.
    """
    cfg: SAEConfig = sae.cfg
    if cfg.arch != "topk":
        raise SAEConfigError(f"only a topk SAE can be written for sparsify, not {cfg.arch!r} (sparsify encodes with a per-token top-k)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    s = float(sae.input_scale)
    with torch.no_grad():
        tensors = {
            "encoder.weight": (sae.W_enc * s).t().float().contiguous(),  # (F, d)
            "encoder.bias": sae.b_enc.float().contiguous(),  # (F,)
            "W_dec": (sae.W_dec / s).float().contiguous(),  # (F, d)
            "b_dec": (sae.b_dec / s).float().contiguous(),  # (d,)
        }
    out_cfg = {"activation": "topk", "expansion_factor": max(1, cfg.width // cfg.d_in), "normalize_decoder": s == 1.0,
               "num_latents": cfg.width, "k": cfg.k, "multi_topk": False, "skip_connection": False, "transcode": False,
               "d_in": cfg.d_in}
    save_file(tensors, str(directory / SPARSIFY_WEIGHTS_FILENAME))
    (directory / CFG_FILENAME).write_text(json.dumps(out_cfg, indent=2))
    return directory


# ----------------------------------------------------------------------------- sparsity.safetensors
def sparsity_from_density(density: Any) -> torch.Tensor:
    """sae-lens's log feature sparsity of firing densities ρ (F,):  log10(ρ + 1e-10)  (float32, F,).

    The floor is sae-lens's own (its trainer adds 1e-10 before log10), so a latent that never fired
    reads -10, never -inf."""
    rho = torch.as_tensor(density, dtype=torch.float64)  # (F,)
    return torch.log10(rho + DENSITY_FLOOR).float()


def save_sparsity(directory: str | Path, log10_density: Any) -> Path:
    """Write ``log10_density`` (F,) as ``directory/sparsity.safetensors``, tensor "sparsity", as sae-lens releases
    carry it (see `sparsity_from_density`); returns the file. Replaces the file in one step (no half-written file)."""
    directory = Path(directory)
    t = torch.as_tensor(log10_density).detach().float().cpu().contiguous()  # (F,)
    if t.dim() != 1 or t.numel() == 0 or torch.isnan(t).any():
        raise SAEError(f"log10 density must be a non-empty 1-D tensor without NaN, got shape {tuple(t.shape)}")
    cfg_path = directory / CFG_FILENAME
    if cfg_path.is_file():
        try:
            d_sae = json.loads(cfg_path.read_text()).get("d_sae")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            d_sae = None
        if isinstance(d_sae, int) and d_sae != t.numel():
            raise SAEError(f"{t.numel()} log10 densities for the SAE in {directory}, which has d_sae={d_sae}")
    target = directory / SPARSITY_FILENAME
    staging = directory / f".{SPARSITY_FILENAME}.partial"
    try:
        save_file({"sparsity": t}, str(staging))
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target
