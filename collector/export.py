"""Exports: a series or a whole run as CSV or Parquet, written piece by piece.

The writers take the store's bounded windows (``Store.series_chunks``, ``Store.table_chunks``) and
yield bytes as they go, so an export of any length holds one window (``EXPORT_CHUNK_POINTS``
points) and its encoding in memory, never the series. The HTTP routes stream them, ``moxco
export`` writes them to a file.

* A series: columns ``step`` (int64), ``value`` (float64; NaN and ±Inf as stored), ``wall_time``
  (float64, seconds since the epoch).
* A run's table, wide by step: ``step``, ``wall_time`` (the earliest of the step's points), then
  one float64 column per metric. In Parquet a metric with no point at a step is null and a stored
  NaN is NaN; in CSV the first is an empty field, the second ``NaN``.

CSV writes non-finite values as ``NaN``, ``Infinity``, ``-Infinity`` (what the JSON API writes;
``pandas.read_csv`` and Python's ``float`` read them) and finite ones with Python's shortest
round-trip repr, so reading the file gives back the stored doubles exactly. Parquet (pyarrow)
files carry the run, rank and metric(s) in their key-value metadata; each window is a row group.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

FORMATS = ("csv", "parquet")
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}
_NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _texts(values: np.ndarray) -> List[str]:
    """Floats as the shortest text that reads back as the same double; non-finite as the API spells them."""
    out = list(map(float.__repr__, values.tolist()))
    for i in np.flatnonzero(~np.isfinite(values)).tolist():
        out[i] = _NONFINITE[out[i]]
    return out


def _csv_row_block(columns: Sequence[List[str]]) -> bytes:
    return ("\n".join(map(",".join, zip(*columns))) + "\n").encode()


def _csv_name(name: str) -> str:
    """A header field: quoted when it holds a comma, quote or line break (RFC 4180)."""
    if any(ch in name for ch in ',"\r\n'):
        return '"' + name.replace('"', '""') + '"'
    return name


def csv_series(chunks: Iterable[Tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Iterator[bytes]:
    """A series (``Store.series_chunks``) as CSV: ``step,value,wall_time``."""
    yield b"step,value,wall_time\n"
    for steps, values, walls in chunks:
        yield _csv_row_block((list(map(str, steps.tolist())), _texts(values), _texts(walls)))


def csv_table(metrics: Sequence[str], chunks: Iterable) -> Iterator[bytes]:
    """A run's table (``Store.table_chunks``) as CSV: ``step,wall_time,<metric>,…``; a metric without
    a point at a step is an empty field."""
    yield (",".join(["step", "wall_time", *map(_csv_name, metrics)]) + "\n").encode()
    for steps, walls, values, present in chunks:
        columns = [list(map(str, steps.tolist())), _texts(walls)]
        for m in metrics:
            texts = _texts(values[m])
            for i in np.flatnonzero(~present[m]).tolist():
                texts[i] = ""
            columns.append(texts)
        yield _csv_row_block(columns)


class _Sink:
    """A write-only file for pyarrow that keeps what was written until ``take``."""

    def __init__(self) -> None:
        self.parts: List[bytes] = []
        self.position = 0
        self.closed = False

    def write(self, data) -> int:
        data = bytes(data)
        self.parts.append(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def _parquet(schema, batches: Iterable[Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]]) -> Iterator[bytes]:
    """Row groups of ``schema`` from ``batches`` (column name → (values, present or None)), as the
    bytes of one Parquet file, yielded as each row group is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = _Sink()
    writer = pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema, compression="zstd")
    try:
        for columns in batches:
            arrays = []
            for f in schema:
                values, present = columns[f.name]
                arrays.append(pa.array(values, type=f.type, mask=None if present is None else ~present))
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            chunk = sink.take()
            if chunk:
                yield chunk
    finally:
        writer.close()
    yield sink.take()


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError("Parquet exports need pyarrow: pip install 'moxco[export]'", name="pyarrow") from None


def parquet_series(chunks: Iterable[Tuple[np.ndarray, np.ndarray, np.ndarray]], metadata: Dict[str, str]) -> Iterator[bytes]:
    """A series as Parquet: ``step`` int64, ``value`` float64 (NaN kept), ``wall_time`` float64."""
    _pyarrow()
    import pyarrow as pa

    schema = pa.schema([("step", pa.int64()), ("value", pa.float64()), ("wall_time", pa.float64())],
                       metadata={k: str(v) for k, v in metadata.items()})
    batches = ({"step": (s, None), "value": (v, None), "wall_time": (w, None)} for s, v, w in chunks)
    yield from _parquet(schema, batches)


def parquet_table(metrics: Sequence[str], chunks: Iterable, metadata: Dict[str, str]) -> Iterator[bytes]:
    """A run's table as Parquet: ``step``, ``wall_time``, one nullable float64 column per metric
    (null: no point at that step; NaN: a stored NaN)."""
    _pyarrow()
    import pyarrow as pa

    schema = pa.schema([("step", pa.int64()), ("wall_time", pa.float64()), *[(m, pa.float64()) for m in metrics]],
                       metadata={k: str(v) for k, v in metadata.items()})
    batches = ({"step": (s, None), "wall_time": (w, None), **{m: (values[m], present[m]) for m in metrics}}
               for s, w, values, present in chunks)
    yield from _parquet(schema, batches)
