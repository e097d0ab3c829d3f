"""Export a workspace's cached activations and their context in layouts that other tools read.

Two layouts, both written in bounded memory (at most ``CHUNK_BYTES`` of activations at a time):

``parquet`` (default)::

    README.md                                   dataset card: YAML ``configs``/``dataset_info`` + provenance
    tokens.parquet                              context_id, position, token_id, doc_id
    contexts/run_id=R/data_0.parquet            context_id, run_id, corpus_context
    documents/corpus_id=C/data_0.parquet        corpus_id, doc_id, domain, source, text
    activations/run_id=R/hook=H/part-*.parquet  run_id, hook, context_id, position, activation

  The partition keys are both folder names (hive style, for DuckDB and ``pyarrow.dataset``) and
  real columns inside every file (for readers that ignore folder names, such as Hugging Face
  ``datasets``). They are stored with the types hive discovery infers (``run_id`` int32,
  ``hook`` string), so a hive-partitioned read merges them into one column instead of failing
  or duplicating them.

``saelens``::

    README.md                                   provenance
    run_id=R/hook=H/                            a Hugging Face ``Dataset`` folder (``load_from_disk``)
        data-00000-of-0000N.arrow, dataset_info.json, state.json

  The layout of sae-lens's ``CacheActivationsRunner``: one row per context, a column named after
  the hook holding ``Array2D(shape=(ctx_len, d))`` and ``token_ids`` (int32, ``ctx_len`` long),
  so ``cached_activations_path=OUT/run_id=R/hook=H`` trains an SAE on it directly.

Activations keep their storage dtype where the target format has it (float16); bfloat16 caches
become float32, since neither Parquet nor Arrow has bfloat16.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import secrets
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from workbench.activations import _run_layout, context_ids, read_contexts
from workbench.errors import WorkbenchError
from workbench.safety import check_writable_dir, sql_string
from workbench.workspace import Workspace, WorkspaceError

__all__ = ["LAYOUTS", "ExportError", "export_activations", "export_parquet", "export_saelens"]

LAYOUTS = ("parquet", "saelens")
CHUNK_BYTES = 64 << 20  # activations held in memory at once (as float32)
SHARD_BYTES = 500 << 20  # at most this many activation bytes per sae-lens arrow file, as `save_to_disk` does


class ExportError(WorkbenchError):
    """An export that cannot be written as asked."""


def workbench_version() -> str:
    try:
        return importlib.metadata.version("sparse-workbench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def export_activations(ws: Workspace, out_dir: str | Path, *, hooks: list[str] | None = None, layout: str = "parquet") -> Path:
    """Write the cached activations of ``hooks`` (default: all) under ``out_dir`` in ``layout``."""
    if layout not in LAYOUTS:
        raise ExportError(f"unknown export layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    return (export_parquet if layout == "parquet" else export_saelens)(ws, out_dir, hooks=hooks)


def _selected(ws: Workspace, hooks: list[str] | None) -> list[tuple[int, str]]:
    """(run_id, hook) of every stored hook to export; unknown hooks are refused before anything is written."""
    stored = [(run_id, hook) for run_id, _, hook, _, n in ws.cached_hooks() if n]
    cached = sorted({hook for _, hook in stored})
    unknown = sorted(set(hooks or ()) - set(cached))
    if unknown:
        raise WorkspaceError(f"hook {unknown[0]!r} is not cached in {ws.path.name}; cached: {', '.join(cached) or 'none'}")
    if not stored:
        raise WorkspaceError(f"nothing to export: {ws.path.name} has no cached activations yet; run `workbench cache` first")
    return [(run_id, hook) for run_id, hook in stored if not hooks or hook in hooks]


def _export_dtype(stored: str) -> str:
    return "float16" if stored == "float16" else "float32"


def _chunks(ids: list[int], ctx_len: int, d: int):
    """``ids`` in slices of at most ``CHUNK_BYTES`` of float32 activations (at least one context)."""
    step = max(1, CHUNK_BYTES // (ctx_len * d * 4))
    for start in range(0, len(ids), step):
        yield ids[start : start + step]


def _read(ws: Workspace, run_id: int, hook: str, ids: list[int], stored: str) -> np.ndarray:
    """[n, ctx_len, d] numpy activations in the export dtype."""
    values = read_contexts(ws, hook, ids, run_id=run_id, dtype=None if stored == "float16" else torch.float32)
    return values.numpy()


# -- Parquet ---------------------------------------------------------------------------------------------------------------


def export_parquet(ws: Workspace, out_dir: str | Path, *, hooks: list[str] | None = None) -> Path:
    """Write tokens, contexts, documents and activations as partitioned Parquet with a dataset card under ``out_dir``.

    ``activations/run_id=R/hook=H/*.parquet`` holds one row per token: run_id, hook, context_id,
    position and ``activation`` (a fixed-size list of float16, or float32 for bfloat16 caches).
    """
    selected = _selected(ws, hooks)
    out = check_writable_dir(out_dir, "export folder").resolve()
    for table, partition in (("tokens", None), ("contexts", "run_id"), ("documents", "corpus_id")):
        # COPY TO cannot bind its file name: the path is quoted by the one tested helper.
        if partition is None:
            target, options = out / f"{table}.parquet", "FORMAT parquet"
        else:
            target, options = out / table, f"FORMAT parquet, OVERWRITE_OR_IGNORE, PARTITION_BY ({partition}), WRITE_PARTITION_COLUMNS true"
        ws.con.execute(f"COPY {table} TO {sql_string(str(target))} ({options})")
    written = []
    for run_id, hook in selected:
        ctx_len, d, stored = _run_layout(ws, run_id, hook)
        dtype = _export_dtype(stored)
        value_type = pa.float16() if dtype == "float16" else pa.float32()
        folder = out / "activations" / f"run_id={run_id}" / f"hook={hook}"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("part-*.parquet"):  # a shorter re-export must not leave old parts behind
            stale.unlink()
        ids = context_ids(ws, hook, run_id=run_id)
        for part, chunk in enumerate(_chunks(ids, ctx_len, d)):
            values = _read(ws, run_id, hook, chunk, stored)
            n = len(chunk) * ctx_len
            table = pa.table(
                {
                    "run_id": pa.array(np.full(n, run_id, np.int32)),
                    "hook": pa.array([hook] * n, pa.string()),
                    "context_id": np.repeat(np.array(chunk, np.int64), ctx_len),
                    "position": np.tile(np.arange(ctx_len, dtype=np.int16), len(chunk)),
                    "activation": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type), d),
                }
            )
            pads.write_dataset(
                table, folder, format="parquet", basename_template=f"part-{part:05d}-{{i}}.parquet",
                existing_data_behavior="overwrite_or_ignore",
            )
        written.append(_provenance(ws, run_id, hook, len(ids), dtype))
    _write_card(out, written, _parquet_configs(out, written))
    return out


def _parquet_configs(out: Path, written: list[dict]) -> list[dict]:
    """The card's ``configs`` with their features: one per exported hook (hooks differ in width, so they
    cannot share one schema), then tokens, contexts and documents."""
    from datasets import Features

    configs = []
    for i, item in enumerate(written):
        folder = f"activations/run_id={item['run_id']}/hook={item['hook']}"
        configs.append({"config_name": item["config"], "data_files": f"{folder}/*.parquet", "default": i == 0,
                        "schema_of": next((out / folder).glob("*.parquet"), None)})
    for name, pattern in (("tokens", "tokens.parquet"), ("contexts", "contexts/*/*.parquet"), ("documents", "documents/*/*.parquet")):
        configs.append({"config_name": name, "data_files": pattern, "schema_of": next(out.glob(pattern), None)})
    for config in configs:
        path = config.pop("schema_of")
        schema = pq.read_schema(path) if path is not None else None
        config["features"] = Features.from_arrow_schema(schema.remove_metadata())._to_yaml_list() if schema is not None else []
        if not config.get("default"):
            config.pop("default", None)
    return configs


# -- sae-lens ------------------------------------------------------------------------------------------------------------


def export_saelens(ws: Workspace, out_dir: str | Path, *, hooks: list[str] | None = None) -> Path:
    """Write each cached hook as sae-lens's cached-activation dataset under ``out_dir/run_id=R/hook=H``."""
    from datasets import Array2D, DatasetInfo, Features, Sequence, Value
    from datasets.features.features import Array2DExtensionType

    selected = _selected(ws, hooks)
    out = check_writable_dir(out_dir, "export folder").resolve()
    written = []
    for run_id, hook in selected:
        ctx_len, d, stored = _run_layout(ws, run_id, hook)
        dtype = _export_dtype(stored)
        features = Features({hook: Array2D(shape=(ctx_len, d), dtype=dtype),
                             "token_ids": Sequence(Value("int32"), length=ctx_len)})
        schema = features.arrow_schema
        ext_type = Array2DExtensionType((ctx_len, d), dtype)
        folder = out / f"run_id={run_id}" / f"hook={hook}"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("data-*.arrow"):
            stale.unlink()
        ids = context_ids(ws, hook, run_id=run_id)
        per_shard = max(1, SHARD_BYTES // (ctx_len * d * np.dtype(dtype).itemsize))
        shards = [ids[s : s + per_shard] for s in range(0, len(ids), per_shard)] or [[]]
        files = []
        for index, shard in enumerate(shards):
            name = f"data-{index:05d}-of-{len(shards):05d}.arrow"
            files.append({"filename": name})
            with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for chunk in _chunks(shard, ctx_len, d):
                    values = _read(ws, run_id, hook, chunk, stored)  # [n, L, d]
                    n = len(chunk)
                    rows = pa.ListArray.from_arrays(pa.array(np.arange(0, n * ctx_len * d + 1, d, dtype=np.int32)),
                                                    pa.array(values.reshape(-1)))  # [n * L] vectors of d
                    storage = pa.ListArray.from_arrays(pa.array(np.arange(0, n * ctx_len + 1, ctx_len, dtype=np.int32)), rows)
                    tokens = _token_ids(ws, chunk, ctx_len)
                    batch = pa.record_batch(
                        [pa.ExtensionArray.from_storage(ext_type, storage.cast(ext_type.storage_type)),
                         pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), ctx_len)],
                        schema=schema,
                    )
                    writer.write_batch(batch)
        info = dataclasses.asdict(DatasetInfo(features=features, description=f"{hook} activations of workbench cache run {run_id}"))
        (folder / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))
        state = {"_data_files": files, "_fingerprint": secrets.token_hex(8), "_format_columns": None, "_format_kwargs": {},
                 "_format_type": None, "_output_all_columns": False, "_split": None}
        (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        written.append(_provenance(ws, run_id, hook, len(ids), dtype))
    _write_card(out, written, None)
    return out


def _token_ids(ws: Workspace, ids: list[int], ctx_len: int) -> np.ndarray:
    """[len(ids), ctx_len] int32 token ids of contexts ``ids``, in that order."""
    rows = ws.con.sql(
        "SELECT context_id, position, token_id FROM tokens WHERE context_id IN (SELECT unnest(?::BIGINT[]))",
        params=[list(ids)],
    ).fetchnumpy()
    where = {cid: i for i, cid in enumerate(ids)}
    out = np.zeros((len(ids), ctx_len), np.int32)
    out[np.array([where[c] for c in rows["context_id"]], np.int64), rows["position"].astype(np.int64)] = rows["token_id"]
    return out


# -- dataset card --------------------------------------------------------------------------------------------------------


def _provenance(ws: Workspace, run_id: int, hook: str, n_contexts: int, dtype: str) -> dict:
    run = next(r for r in ws.runs() if r["run"] == run_id)
    ctx_len, d, stored = _run_layout(ws, run_id, hook)
    return {"config": f"activations-run{run_id}-{hook}", "run_id": run_id, "hook": hook, "model": run["model"],
            "corpus": run["corpus"], "ctx_len": ctx_len, "d": d, "stored_dtype": stored, "dtype": dtype,
            "contexts": n_contexts, "tokens": n_contexts * ctx_len}


def _yaml(value, indent: int = 0) -> list[str]:
    """A small YAML writer for the card's front matter: dicts, lists, strings, numbers and booleans."""
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines += _yaml(item, indent + 2)
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return lines
    lines = []
    for item in value:
        sub = _yaml(item, indent + 2) if isinstance(item, (dict, list)) else [f"{pad}  {_scalar(item)}"]
        lines.append(f"{pad}- {sub[0].lstrip()}")
        lines += sub[1:]
    return lines


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return "[]" if isinstance(value, list) else "{}"
    return json.dumps(str(value))  # a JSON string is a valid YAML double-quoted scalar


def _write_card(out: Path, written: list[dict], configs: list[dict] | None) -> None:
    front = {}
    if configs is not None:
        front["configs"] = [{k: c[k] for k in ("config_name", "data_files", "default") if k in c} for c in configs]
        front["dataset_info"] = [{"config_name": c["config_name"], "features": c["features"]} for c in configs]
    front["tags"] = ["activations", "sparse-autoencoders", "workbench"]
    lines = ["---", *_yaml(front), "---", "", "# Cached model activations", ""]
    version = workbench_version()
    if configs is not None:
        lines += ["Exported by sparse-workbench " + version + " (`workbench export`) as Parquet. Each `activations-*` config is one",
                  "cached hook: one row per token with `run_id`, `hook`, `context_id`, `position` and `activation`",
                  "(the hook's output vector). `tokens` maps (`context_id`, `position`) to `token_id` and `doc_id`",
                  "(-1 for BOS and separators); `contexts` and `documents` hold the corpus behind them.", ""]
    else:
        lines += ["Exported by sparse-workbench " + version + " (`workbench export --layout saelens`) in sae-lens's",
                  "cached-activation layout: each `run_id=R/hook=H` folder is a Hugging Face `Dataset` saved with",
                  "`save_to_disk`, one row per context, for `cached_activations_path`.", ""]
    lines += ["| run | hook | model | corpus | ctx | d | stored dtype | exported dtype | contexts | tokens |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for w in written:
        lines.append(f"| {w['run_id']} | `{w['hook']}` | {w['model']} | {w['corpus']} | {w['ctx_len']} | {w['d']} | "
                     f"{w['stored_dtype']} | {w['dtype']} | {w['contexts']:,} | {w['tokens']:,} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
