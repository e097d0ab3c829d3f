"""How rows reach the workspace's tables, shared by every writer (caching, analysis, probes).

- ``STORAGE_DTYPES``: the 2-byte float formats activations are stored in, one blob per
  (hook, context); ``activations`` reads them back.
- ``insert_arrow``: append an Arrow table in one statement (thousands of rows at Arrow speed).
"""

from __future__ import annotations

import pyarrow as pa
import torch

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def insert_arrow(con, table: str, rows: pa.Table | dict) -> None:
    """Append ``rows`` (an Arrow table, or a dict of columns) to ``table``; columns in schema order.
    ``table`` is one of the workspace's own table names, never user input."""
    rows = rows if isinstance(rows, pa.Table) else pa.table(rows)
    if rows.num_rows == 0:
        return
    con.register("_incoming", rows)
    try:
        con.execute(f"INSERT INTO {table} SELECT * FROM _incoming")
    finally:
        con.unregister("_incoming")
