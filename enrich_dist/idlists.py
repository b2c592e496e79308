"""Files that list images: already-labelled images, seed sets (CSV or Parquet with ``image_id`` or ``uri``,
or plain text, one per line)."""

from __future__ import annotations

import io

import pyarrow.csv as pacsv
import pyarrow.parquet as pq


def read_id_list(path: str, data: bytes) -> list[int | str]:
    """Image ids (ints) or uris (strings) listed in the file ``path`` whose bytes are ``data``."""
    name = path.lower()
    if name.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
    elif name.endswith(".csv"):
        table = pacsv.read_csv(io.BytesIO(data))
    else:
        lines = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
        if lines and lines[0] in ("image_id", "uri"):
            lines = lines[1:]
        return [int(v) if v.lstrip("-").isdigit() else v for v in lines]
    for column in ("image_id", "uri"):
        if column in table.column_names:
            values = table[column].to_pylist()
            if column == "image_id":
                return [int(v) for v in values if v is not None]
            return [str(v) for v in values if v is not None]
    raise ValueError(f"seed id file {path} needs an image_id or uri column, has {table.column_names}")
