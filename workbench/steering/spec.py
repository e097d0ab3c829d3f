"""Steering specs: a list of interventions, each on one hook, serialised to JSON and back.

An intervention is ``(hook, source, index | vector, method, strength, unit[, code_mode])``:

    add     x ← x + s·v           (v: the feature's decoder direction in ``unit``, or a raw vector)
    clamp   x ← x̂(z with z_i := s·σ) + (x − x̂(z))      σ = 1 (unit raw) or the feature's scale
    ablate  clamp with s = 0
    code    a codebook code forced into the selected set, in one of two ``code_mode``s:
              replace_lowest   the forced code replaces the lowest-scoring selected code (default)
              replace_all      all k selected codes are replaced by the forced one: only it is active

The exact hook arithmetic lives in ``hooks.py``; this module only checks and (de)serialises.
JSON: ``{"version": 1, "interventions": [{"hook": ..., "source": ..., "index": ..., ...}]}``;
keys left at None are not written, so a spec without codes reads the same as before ``code_mode``.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from workbench.errors import WorkbenchError

METHODS = ("add", "clamp", "ablate", "code")
UNITS = ("raw", "feature_max", "feature_p99")
CODE_MODES = ("replace_lowest", "replace_all")
DEFAULT_CODE_MODE = "replace_lowest"
SPEC_VERSION = 1
MAX_STRENGTH = 1e4  # |strength| bound, in the strength's unit: far past where text stops being text
MAX_SPEC_CHARS = 1_000_000


class SteeringError(WorkbenchError):
    """A steering spec, SAE, feature, hook or strength that cannot be applied (one line)."""


def default_unit(method: str, is_vector: bool = False) -> str:
    """The unit a strength is read in when none is given: the feature's p99 for ``add`` of a feature, else raw."""
    return "feature_p99" if method == "add" and not is_vector else "raw"


def parse_indices(text: str, *, what: str = "feature ids") -> tuple[int, ...]:
    """``"3, 17 5"`` → (3, 17, 5): non-negative whole numbers separated by commas or spaces, duplicates dropped."""
    parts = [p for p in str(text).replace(",", " ").split() if p]
    out: list[int] = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise SteeringError(f"{what} must be whole numbers separated by commas, got '{part}'") from None
        if value < 0:
            raise SteeringError(f"{what} must be non-negative, got {value}")
        if value not in out:
            out.append(value)
    return tuple(out)


def parse_strengths(text: str, *, limit: int = 12) -> tuple[float, ...]:
    """``"0, 1, 2.5"`` → (0.0, 1.0, 2.5): finite numbers separated by commas or spaces, at most ``limit``."""
    parts = [p for p in str(text).replace(",", " ").split() if p]
    if not parts:
        raise SteeringError("give at least one strength, e.g. 0, 1, 2, 4")
    if len(parts) > limit:
        raise SteeringError(f"at most {limit} strengths, got {len(parts)}")
    out = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise SteeringError(f"strengths must be numbers separated by commas, got '{part}'") from None
        if not math.isfinite(value) or abs(value) > MAX_STRENGTH:
            raise SteeringError(f"strength must be a finite number within ±{MAX_STRENGTH:g} (in its unit), got {part}")
        out.append(value)
    return tuple(out)


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
    """add: multiple of the unit direction; clamp: the latent value (× scale in feature units);
    code: the forced code's weight; ablate: 0."""
    unit: str | None = None
    """raw, feature_max or feature_p99; None → feature_p99 for ``add`` of a feature, raw otherwise."""
    code_mode: str | None = None
    """code only: replace_lowest (default) or replace_all; None for the other methods."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SteeringError(f"unknown steering method {self.method!r}; valid: {', '.join(METHODS)}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, numbers.Real):
            raise SteeringError(f"strength must be a number, got {self.strength!r}")
        if not math.isfinite(float(self.strength)) or abs(float(self.strength)) > MAX_STRENGTH:
            raise SteeringError(f"strength must be a finite number within ±{MAX_STRENGTH:g} (in its unit), got {self.strength}")
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
        unit = self.unit if self.unit is not None else default_unit(self.method, self.vector is not None)
        if unit not in UNITS:
            raise SteeringError(f"unknown strength unit {unit!r}; valid: {', '.join(UNITS)}")
        if unit != "raw" and (self.vector is not None or self.method in ("code", "ablate")):
            raise SteeringError(f"unit {unit!r} needs an SAE feature with add or clamp; use unit 'raw'")
        object.__setattr__(self, "unit", unit)
        if self.method == "code":
            mode = DEFAULT_CODE_MODE if self.code_mode is None else self.code_mode
            if mode not in CODE_MODES:
                raise SteeringError(f"unknown code_mode {mode!r}; valid: {', '.join(CODE_MODES)}")
            object.__setattr__(self, "code_mode", mode)
        elif self.code_mode is not None:
            raise SteeringError(f"code_mode applies to method 'code' only, not {self.method!r}")

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
        for key in ("hook", "source", "method", "unit", "code_mode"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise SteeringError(f"intervention field {key!r} must be a string, got {d[key]!r}")
        if d.get("vector") is not None and not isinstance(d["vector"], list):
            raise SteeringError("intervention field 'vector' must be a list of numbers")
        return cls(**d)

    def describe(self, hook: str | None = None) -> str:
        what = f"vector (dim {len(self.vector)})" if self.vector is not None else f"feature {self.index} of {self.source}"
        if self.method == "code":
            what = f"code {self.index} of {self.source} ({self.code_mode})"
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
        if isinstance(text, str) and len(text) > MAX_SPEC_CHARS:
            raise SteeringError(f"a steering spec is at most {MAX_SPEC_CHARS:,} characters, got {len(text):,}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SteeringError(f"malformed steering spec JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
        except RecursionError:
            raise SteeringError("malformed steering spec JSON: nested too deeply") from None
        except TypeError:
            raise SteeringError(f"a steering spec is JSON text, got {type(text).__name__}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        try:
            path.write_text(self.to_json() + "\n")
        except OSError as err:
            raise SteeringError(f"cannot write steering spec {path}: {err.strerror or err.__class__.__name__}") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SteeringSpec":
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise SteeringError(f"cannot read steering spec {path}: "
                                f"{err.__class__.__name__}: {getattr(err, 'strerror', None) or err}") from None
        return cls.from_json(text)
