"""Features page helpers: the table's rows, filters and sort orders, and which feature a selection picked.

Pure functions over what ``cached.feature_table``, ``cached.labels`` and ``cached.feature_map`` return;
no workspace access and no Streamlit calls, so they are tested directly (a plotly or dataframe selection
cannot be made under ``AppTest``).
"""

from __future__ import annotations

import math
from typing import Any

SORTS = {  # sort choice -> (key on a row, descending)
    "feature id": ("feature", False),
    "density (highest first)": ("density", True),
    "density (lowest first)": ("density", False),
    "max activation (highest first)": ("max activation", True),
    "label score (highest first)": ("score", True),
    "label (A to Z)": ("label", False),
}


def rows(table: dict[str, list], labels: dict[int, tuple]) -> list[dict]:
    """One row per feature: id, label, score, density, firings, max and mean activation, dominant domain and its share."""
    out = []
    for i, f in enumerate(table["feature"]):
        label, score, _ = labels.get(int(f), ("", None, ""))
        out.append({
            "feature": int(f), "label": label, "score": score, "density": table["density"][i], "fired": table["n_fired"][i],
            "max activation": table["max"][i], "mean activation": table["mean"][i],
            "dominant domain": table["domain"][i], "domain share": table["domain_share"][i],
        })
    return out


def log_density_bounds(table: dict[str, list]) -> tuple[float, float] | None:
    """(floor, 0) of log10 density over the features that fired; None when none did."""
    logs = [math.log10(d) for d in table["density"] if d > 0]
    if not logs:
        return None
    return float(math.floor(min(logs) * 10) / 10), 0.0


def matches(row: dict, text: str) -> bool:
    """A filter text matches a feature by its id (a whole number) or by a case-insensitive part of its label."""
    text = text.strip()
    if not text:
        return True
    if text.isdigit() and int(text) == row["feature"]:
        return True
    return text.lower() in (row["label"] or "").lower()


def filtered(table_rows: list[dict], *, text: str = "", domain: str | None = None, live_only: bool = False,
             log_density: tuple[float, float] | None = None, labelled_only: bool = False) -> list[dict]:
    """The rows that pass every filter; ``log_density`` bounds log10(density) of features that fired (dead ones pass
    only without ``live_only`` and bounds)."""
    out = []
    for row in table_rows:
        if not matches(row, text):
            continue
        if domain and row["dominant domain"] != domain:
            continue
        if live_only and row["fired"] <= 0:
            continue
        if labelled_only and not row["label"]:
            continue
        if log_density is not None and row["density"] > 0:
            lo, hi = log_density
            value = math.log10(row["density"])
            if value < lo - 1e-9 or value > hi + 1e-9:
                continue
        out.append(row)
    return out


def sorted_rows(table_rows: list[dict], how: str) -> list[dict]:
    """Rows in the order ``how`` (a key of ``SORTS``); empty labels and missing scores go last; ties by feature id."""
    key, descending = SORTS[how]

    def order(row: dict) -> tuple:
        value = row[key]
        missing = value is None or value == ""
        if missing:
            return (1, 0, row["feature"])
        if isinstance(value, str):
            return (0, value.lower(), row["feature"])
        return (0, -value if descending else value, row["feature"])

    return sorted(table_rows, key=order)


def selected_feature(selection: Any, traces: list[list[int]]) -> int | None:
    """The feature a plotly selection (``st.plotly_chart(..., on_select="rerun")``) picked: the first point's
    ``customdata`` when present, else its (curve number, point index) in ``traces``. None without a point."""
    points = _get(_get(selection, "selection"), "points") or []
    for point in points:
        data = _get(point, "customdata")
        if isinstance(data, (list, tuple)):
            data = data[0] if data else None
        if data is not None:
            return int(data)
        curve, index = _get(point, "curve_number"), _get(point, "point_index")
        if curve is not None and index is not None and curve < len(traces) and index < len(traces[curve]):
            return int(traces[curve][index])
    return None


def selected_row(selection: Any, shown: list[dict]) -> int | None:
    """The feature of the table row a dataframe selection (``on_select="rerun"``) picked, None without one."""
    picked = _get(_get(selection, "selection"), "rows") or []
    return int(shown[picked[0]]["feature"]) if picked and picked[0] < len(shown) else None


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)
