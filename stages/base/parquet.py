"""Reading one Parquet file (a path, or bytes fetched from the store) as a table.

`pq.read_table` reads through pyarrow.dataset, whose first import costs ~0.2-0.4 s, and, given a
path, adds partition columns from any `key=value` folders in it; every table here is one file.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def read_parquet(source: bytes | str | Path) -> pa.Table:
    """The whole file; use_threads=False: pyarrow 26 can abort at interpreter exit after threaded reads (apache/arrow#34314)."""
    return pq.ParquetFile(pa.BufferReader(source) if isinstance(source, bytes) else str(source)).read(use_threads=False)
