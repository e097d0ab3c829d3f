"""Pretrained SAEs by name: ``saelens:RELEASE/SAE_ID`` through sae-lens's pretrained registry.

The spec names an entry of the registry that ships with sae-lens (its ``pretrained_saes.yaml``):
RELEASE is everything before the first ``/`` (no release name contains one), SAE_ID the rest
(ids often do: ``gemma-scope-2b-pt-res-canonical/layer_0/width_16k/canonical``).

``prepare_pretrained`` turns a spec into an SAE folder the workspace can register, checking before
anything is written or downloaded beyond the SAE's config:

1. the release and id exist in the registry (offline; an unknown one is one line with the closest names);
2. the SAE's hook is cached in the workspace (or equals ``--hook``; ``blocks.L.hook_resid_pre`` and
   ``blocks.L-1.hook_resid_post`` are the same activation), its ``d_in`` is that hook's width, and
   the registry's model is the one that cached the hook (aliases and hub ids are compared by name);
3. its architecture is one this workbench reads (standard, topk, jumprelu on the hook's activations
   as they are).

Then sae-lens's own loader for the release builds the SAE (downloading into the Hugging Face cache,
folding a release's input scaling into the weights) and sae-lens's ``save_model`` writes it, in
SAELens layout, to ``DB.saes/saelens/RELEASE/SAE_ID/``; ``saes.load_sae`` reads it back before the
folder takes its place. A later registration of the same spec reuses that folder without the network.

Offline (``HF_HUB_OFFLINE=1``, or no connection to the hub within a few seconds, see
``workbench.data.hub``) the Hugging Face cache is read and a miss is one line at once.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from workbench.data.hub import hub_unreachable
from workbench.errors import WorkbenchError, first_line
from workbench.safety import confined
from workbench.workspace import SAERecord, Workspace, WorkspaceError, fetch_one

PREFIX = "saelens:"
ARCHITECTURES = ("standard", "topk", "jumprelu")  # what saes.load_sae reads from a SAELens-layout folder
EXAMPLE = "saelens:gemma-scope-2b-pt-res-canonical/layer_0/width_16k/canonical"
MODEL_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # workbench aliases that name a hub model
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_RESID_PRE = re.compile(r"blocks\.(\d+)\.hook_resid_pre")


class PretrainedError(WorkbenchError):
    """A pretrained SAE spec that is malformed, unknown, unreachable or does not fit the workspace."""


@dataclass(frozen=True)
class PretrainedSpec:
    release: str
    sae_id: str

    def __str__(self) -> str:
        return f"{PREFIX}{self.release}/{self.sae_id}"


@dataclass(frozen=True)
class PreparedSAE:
    """A pretrained SAE converted into a folder of the workspace, with where it is registered."""

    spec: PretrainedSpec
    folder: Path
    hook: str
    run_id: int
    name: str


def is_spec(text: object) -> bool:
    """Whether ``text`` is a ``saelens:`` spec (not a folder or a workspace SAE name)."""
    return isinstance(text, str) and text.startswith(PREFIX)


def parse_spec(text: str) -> PretrainedSpec:
    """``saelens:RELEASE/SAE_ID`` split at the first ``/``; a malformed spec is one line."""
    body = text[len(PREFIX):] if is_spec(text) else text
    release, slash, sae_id = body.partition("/")
    if not slash or not release.strip() or not sae_id.strip() or _CONTROL.search(body):
        raise PretrainedError(f"invalid pretrained SAE {text!r}: write saelens:RELEASE/SAE_ID, e.g. {EXAMPLE}")
    return PretrainedSpec(release, sae_id)


# -- the registry ----------------------------------------------------------------------------------
def registry() -> dict:
    """sae-lens's pretrained registry: release -> ``PretrainedSAELookup`` (read from the YAML it ships)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def _closest(word: str, choices: list[str], n: int = 3) -> list[str]:
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
    if not close:
        lowered = word.lower()
        close = [c for c in choices if lowered in c.lower() or c.lower() in lowered][:n]
    return close


def lookup(spec: PretrainedSpec):
    """The registry entry of ``spec``'s release, after checking that it holds ``spec``'s id."""
    releases = registry()
    entry = releases.get(spec.release)
    if entry is None:
        repo = next((r for r in sorted({e.repo_id for e in releases.values()}, key=len, reverse=True)
                     if f"{spec.release}/{spec.sae_id}".startswith(r + "/")), None)
        if repo is not None:
            names = sorted(r for r, e in releases.items() if e.repo_id == repo)
            raise PretrainedError(f"'{repo}' is a Hugging Face repository, not a sae-lens release; its releases: "
                                  f"{', '.join(names)} (write saelens:RELEASE/SAE_ID)")
        close = _closest(spec.release, sorted(releases))
        hint = f"closest: {', '.join(close)}" if close else f"none of its {len(releases)} releases is close"
        raise PretrainedError(f"unknown sae-lens release '{spec.release}'; {hint}")
    if spec.sae_id not in entry.saes_map:
        ids = list(entry.saes_map)
        close = _closest(spec.sae_id, ids)
        hint = f"closest: {', '.join(close)}" if close else f"its {len(ids)} SAEs include {', '.join(ids[:3])}"
        raise PretrainedError(f"sae-lens release '{spec.release}' has no SAE '{spec.sae_id}'; {hint}")
    return entry


# -- names and places ------------------------------------------------------------------------------
def _component(part: str) -> str:
    part = _UNSAFE.sub("_", part)
    return part if part.strip(".") else "_"


def converted_folder(ws: Workspace, spec: PretrainedSpec) -> Path:
    """Where the workspace keeps ``spec`` in SAELens layout: ``DB.saes/saelens/RELEASE/SAE_ID``."""
    parts = [_component(spec.release), *(_component(p) for p in spec.sae_id.split("/"))]
    return confined(ws.weights_dir, Path("saelens", *parts))


def default_name(spec: PretrainedSpec) -> str:
    """A workspace SAE name for ``spec``: RELEASE.SAE_ID with ``/`` as ``.`` (hashed when over 128 characters)."""
    name = _UNSAFE.sub("_", f"{spec.release}.{spec.sae_id.replace('/', '.')}").lstrip("._-") or "pretrained"
    if len(name) > 128:
        name = name[:119] + "-" + hashlib.sha256(str(spec).encode()).hexdigest()[:8]
    return name


# -- checks against the workspace -----------------------------------------------------------------
def _canonical_hook(hook: str) -> str:
    """``blocks.L.hook_resid_pre`` (L ≥ 1) is ``blocks.L-1.hook_resid_post``: one name per activation."""
    m = _RESID_PRE.fullmatch(hook)
    return f"blocks.{int(m.group(1)) - 1}.hook_resid_post" if m and int(m.group(1)) > 0 else hook


def same_hook(a: str, b: str) -> bool:
    return _canonical_hook(a) == _canonical_hook(b)


def _model_keys(name: str) -> set[str]:
    """Spellings of a model name: as given, its hub id (workbench alias or TransformerLens official
    name), and each without its organisation or folder; lower case."""
    names = {name, MODEL_HUB_IDS.get(name, name)}
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        names.add(get_official_model_name(name))
    except Exception:  # not a TransformerLens name (or no TransformerLens): the name as it is
        pass
    keys = set()
    for n in names:
        n = n.strip().rstrip("/").lower()
        keys |= {n, n.rsplit("/", 1)[-1]}
    return keys - {""}


def same_model(a: str, b: str) -> bool:
    """Whether two model names (alias, TransformerLens name, hub id or folder) name the same model."""
    return bool(_model_keys(a) & _model_keys(b))


def _metadata(cfg: dict, key: str):
    meta = cfg.get("metadata") or {}
    return meta.get(key) if meta.get(key) is not None else cfg.get(key)


def _choose_hook(ws: Workspace, spec: PretrainedSpec, sae_hook: str | None, hook: str | None, run_id: int | None) -> tuple[str, int]:
    """The cached hook (and its run) the SAE is registered on."""
    if hook is not None:
        if sae_hook is not None and not same_hook(sae_hook, hook):
            raise PretrainedError(f"{spec} reads hook '{sae_hook}', not --hook '{hook}': leave --hook out or cache '{sae_hook}'")
        return hook, ws.resolve_hook_run(hook, run_id)
    if sae_hook is None:
        raise PretrainedError(f"{spec}'s config names no hook: give --hook")
    cached = sorted({h for r, _, h, _, n in ws.cached_hooks() if n > 0 and (run_id is None or r == run_id) and same_hook(h, sae_hook)})
    if not cached:
        listing = ", ".join(sorted({h for _, _, h, _, n in ws.cached_hooks() if n > 0})) or "none"
        raise PretrainedError(f"{spec} reads hook '{sae_hook}', which {ws.path.name} has not cached (cached: {listing}); "
                              f"cache it first with `workbench cache --hook {sae_hook} ...`")
    if len(cached) > 1:
        raise PretrainedError(f"{spec} reads '{sae_hook}', cached as {' and '.join(cached)}: choose one with --hook")
    return cached[0], ws.resolve_hook_run(cached[0], run_id)


def check_fits(ws: Workspace, spec: PretrainedSpec, cfg: dict, trained_on: str, hook: str | None, run_id: int | None,
               allow_model_mismatch: bool = False) -> tuple[str, int]:
    """Every check of ``spec``'s config against the workspace; returns the hook and run to register it on."""
    from workbench.training import hook_dim

    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise PretrainedError(f"{spec} is a '{arch}' SAE; this workbench reads {', '.join(ARCHITECTURES)} dictionaries")
    if (cfg.get("reshape_activations") or "none") != "none":
        raise PretrainedError(f"{spec} reshapes its hook's activations ({cfg['reshape_activations']}: attention heads "
                              "concatenated); this workbench's SAEs read a hook's activations as they are")
    if _metadata(cfg, "hook_head_index") is not None:
        raise PretrainedError(f"{spec} reads attention head {_metadata(cfg, 'hook_head_index')} alone; "
                              "this workbench's SAEs read a whole hook")
    hook, run_id = _choose_hook(ws, spec, _metadata(cfg, "hook_name"), hook, run_id)
    run_model = ws.run_model(run_id)
    if not allow_model_mismatch and not same_model(trained_on, run_model):
        raise PretrainedError(f"{spec} was trained on model '{trained_on}', but run {run_id} of {ws.path.name} cached "
                              f"'{hook}' with '{run_model}'; cache that model, or pass --allow-model-mismatch if they are the same")
    d = hook_dim(ws, run_id, hook)
    if int(cfg.get("d_in", -1)) != d:
        raise PretrainedError(f"{spec} has d_in={cfg.get('d_in')}, but '{hook}' of run {run_id} has d={d}")
    return hook, run_id


# -- the hub ---------------------------------------------------------------------------------------
@contextmanager
def hub_errors(spec: PretrainedSpec, repo_id: str) -> Iterator[None]:
    """Turn what sae-lens's loaders raise while reaching the hub (or the local cache) into one line."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    offline = hub_unreachable()  # decided once, in a few seconds; offline, the loaders read the cache only
    try:
        yield
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        if offline:
            fix = "unset it to download" if "HF_HUB_OFFLINE" in offline else "download it once with the hub reachable"
            raise PretrainedError(f"{spec} is not in the local Hugging Face cache and {offline}: {fix}") from None
        raise PretrainedError(f"cannot download {spec} from {repo_id}: {first_line(err)}") from None
    except GatedRepoError:
        raise PretrainedError(f"{repo_id} is gated on the Hugging Face hub: accept its terms there and log in "
                              f"(`hf auth login`) to download {spec}") from None
    except RepositoryNotFoundError:
        raise PretrainedError(f"the Hugging Face hub has no repository {repo_id} (named by {spec})") from None
    except EntryNotFoundError as err:
        raise PretrainedError(f"{repo_id} lacks a file of {spec}: {first_line(err)}") from None
    except (HfHubHTTPError, ConnectionError, TimeoutError, *_http_errors()) as err:
        raise PretrainedError(f"cannot download {spec} from {repo_id}: {first_line(err)}") from None


def _http_errors() -> tuple[type[BaseException], ...]:
    """The connection errors of the HTTP clients sae-lens and huggingface_hub use."""
    out: list[type[BaseException]] = []
    for module, attribute in (("requests", "RequestException"), ("httpx", "HTTPError")):
        try:
            out.append(getattr(__import__(module), attribute))
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def fetch_config(spec: PretrainedSpec, repo_id: str) -> dict:
    """The SAE's config as sae-lens reads it (its cfg.json, or what its release's converter derives)."""
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    with hub_errors(spec, repo_id):
        try:
            return load_sae_config_from_huggingface(spec.release, spec.sae_id, device="cpu")
        except (KeyError, ValueError) as err:
            if isinstance(err, WorkbenchError):
                raise
            raise PretrainedError(f"sae-lens cannot read the config of {spec}: {first_line(err)}") from None


def _convert(ws: Workspace, spec: PretrainedSpec, repo_id: str, folder: Path, d_in: int) -> None:
    """Build ``spec`` with sae-lens, save it with sae-lens in SAELens layout, check that ``saes.load_sae``
    reads it, then move it to ``folder`` (a whole folder or none)."""
    from sae_lens import SAE

    import saes

    tmp = Path(tempfile.mkdtemp(prefix=".workbench-saelens-", dir=ws.path.parent))
    try:
        with hub_errors(spec, repo_id):
            try:
                sae, _, _ = SAE.from_pretrained_with_cfg_and_sparsity(spec.release, spec.sae_id, device="cpu", dtype="float32")
            except (KeyError, ValueError, RuntimeError) as err:
                if isinstance(err, WorkbenchError):
                    raise
                raise PretrainedError(f"sae-lens cannot load {spec}: {first_line(err)}") from None
        sae.cfg.metadata.pretrained = str(spec)  # provenance in cfg.json
        sae.save_model(tmp)
        del sae
        try:
            saes.load_sae(tmp, expected_d_in=d_in)
        except saes.SAEError as err:
            raise PretrainedError(f"{spec} cannot be used here: {str(err).replace(str(tmp), 'its folder')}") from None
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            shutil.rmtree(folder)  # a stale copy under the workspace's own folder
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _saved_config(folder: Path) -> dict | None:
    """cfg.json of an earlier conversion, None when there is none (or it cannot be read: convert again)."""
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and (folder / "sae_weights.safetensors").is_file() else None


def _check_name_free(ws: Workspace, name: str) -> None:
    row = fetch_one(ws.con, "SELECT sae_id, status FROM saes WHERE name = ?", [name])
    if row is not None and row[1] == "done":
        raise PretrainedError(f"an SAE named '{name}' is already in {ws.path.name} (sae {row[0]}): use it by that name, "
                              "or choose another --name")


def prepare_pretrained(ws: Workspace, text: str, *, hook: str | None = None, run_id: int | None = None,
                       name: str | None = None, allow_model_mismatch: bool = False) -> PreparedSAE:
    """Check ``saelens:RELEASE/SAE_ID`` against the registry and the workspace, then download and
    convert it into the workspace's weights folder (once); ``training.register_saved`` registers the result."""
    from workbench.safety import check_name

    spec = parse_spec(text)
    entry = lookup(spec)
    name = check_name(name or default_name(spec), "SAE name")
    _check_name_free(ws, name)  # the cheap checks before the hub is asked
    folder = converted_folder(ws, spec)
    cfg = _saved_config(folder)  # converted before: no network
    reuse = cfg is not None
    if not reuse:
        cfg = fetch_config(spec, entry.repo_id)
    hook, run_id = check_fits(ws, spec, cfg, entry.model, hook, run_id, allow_model_mismatch)
    if not reuse:
        from workbench.training import hook_dim

        _convert(ws, spec, entry.repo_id, folder, hook_dim(ws, run_id, hook))
    return PreparedSAE(spec, folder, hook, run_id, name)


def register_pretrained(ws: Workspace, text: str, *, hook: str | None = None, run_id: int | None = None,
                        name: str | None = None, model=None, device=None, allow_model_mismatch: bool = False):
    """``prepare_pretrained``, then evaluate and record it like ``workbench eval`` does (a ``TrainedSAE``)."""
    from workbench.training import register_saved

    got = prepare_pretrained(ws, text, hook=hook, run_id=run_id, name=name, allow_model_mismatch=allow_model_mismatch)
    return register_saved(ws, got.folder, got.hook, name=got.name, run_id=got.run_id, model=model, device=device)


def resolve_registered(ws: Workspace, text: str) -> SAERecord:
    """The workspace SAE registered from spec ``text``; one line saying how to register it when none is."""
    from workbench.workspace import resolve_sae

    spec = parse_spec(text)
    folder = converted_folder(ws, spec)
    rows = ws.query("SELECT sae_id, name FROM saes WHERE status = 'done' AND path = ? ORDER BY sae_id", [str(folder)])
    if not rows:
        raise WorkspaceError(f"{spec} is not registered in {ws.path.name}: run `workbench eval --db {ws.path} --sae {spec}` first")
    if len(rows) > 1:
        raise WorkspaceError(f"{spec} is registered several times in {ws.path.name} ({', '.join(n for _, n in rows)}): "
                             "give one of these names")
    return resolve_sae(ws, rows[0][0])
