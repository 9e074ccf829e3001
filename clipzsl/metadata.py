"""Metadata columns of an image index, kept beside its rows and filtered at search time.

    metadata.parquet   one row per indexed image: `path` (the index's key), then the path-derived
                       columns `folder` (the parent folder's name), `name` (the file's name), `width`
                       and `height` (pixels, read from the image file's header when it is indexed;
                       null where unknown, as for vectors imported from shards without them), then
                       any extra columns: from a sidecar CSV keyed by `path` (`read_sidecar`) or from
                       clip-retrieval metadata shards (`shard_columns`)

The file is written atomically; its size and CRC-32 are noted in the store's table (under
`METADATA_STATE`), and it is checked against them and against `check_schema` when read, so a
damaged or hand-edited file is refused (`clipzsl index repair` rebuilds the path-derived columns).
It is keyed by path, not by row, so a compaction (which renumbers the rows) leaves it valid; the
rows of the keys are looked up again whenever the rows move (`Metadata.allowed`).

A search inside a filter (`clipzsl.where`) runs as: the filter over the table (pyarrow.compute) ->
the allowed global rows (`clipzsl.saved_index.Allowed`) -> `SavedIndex.search(..., allowed=...)`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import where as filters
from .errors import InputError
from .saved_index import Allowed
from .store import METADATA_FILE, EmbeddingStore, StoreError, atomic_write, file_crc
from .where import matching

logger = logging.getLogger(__name__)

METADATA_STATE = "metadata_"
#: the key column and the columns every index has, derived from the path (width, height from the file)
KEY = "path"
PATH_COLUMNS = ("folder", "name", "width", "height")
#: the kinds of column the filter language compares (others are refused when read from a CSV or shard)
COLUMN_KINDS = "text (string), integer, floating point or boolean"


def _types() -> dict[str, Any]:
    import pyarrow as pa

    return {KEY: pa.string(), "folder": pa.string(), "name": pa.string(), "width": pa.int64(), "height": pa.int64()}


def image_size(path: str) -> tuple[int | None, int | None]:
    """(width, height) from an image file's header (PIL reads no pixels for it); (None, None) when unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, None


def path_columns(paths: Sequence[str], sizes: bool = True) -> Any:
    """The path-derived columns of `paths` (pyarrow table): path, folder, name, and with `sizes` the width
    and height from each file's header (else null)."""
    import pyarrow as pa

    measured = [image_size(p) if sizes else (None, None) for p in paths]
    columns = {KEY: list(paths), "folder": [os.path.basename(os.path.dirname(p)) for p in paths],
               "name": [os.path.basename(p) for p in paths],
               "width": [w for w, _ in measured], "height": [h for _, h in measured]}
    return pa.table(columns, schema=pa.schema(list(_types().items())))


def _column_type(name: str, type_: Any, where: str) -> Any:
    """The stored type of an extra column of `type_` (integers as int64, floats as float64), or an InputError."""
    import pyarrow as pa

    if not name.isidentifier() or name.lower() in ("and", "or", "not", "in", "true", "false"):
        raise InputError(f"{where}: column {name!r} is not a plain name (letters, digits, _, not a keyword); "
                         "rename it so a filter can name it")
    for check, stored in ((pa.types.is_boolean, pa.bool_()), (pa.types.is_integer, pa.int64()),
                          (pa.types.is_floating, pa.float64()), (pa.types.is_string, pa.string()),
                          (pa.types.is_large_string, pa.string()), (pa.types.is_null, pa.string())):
        if check(type_):
            return stored
    raise InputError(f"{where}: column {name!r} holds {type_}; metadata columns hold {COLUMN_KINDS} values: "
                     "convert it, or leave it out")


def extra_table(table: Any, where: str, sizes: bool = False) -> Any:
    """`table` (with a `path` column) with its other columns checked and cast to the stored types; a path
    given twice, a missing path or a column named like a path-derived one (but `width` and `height` with
    `sizes`) is an InputError naming `where`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if KEY not in table.column_names:
        raise InputError(f"{where}: no `path` column; give each row's image path in a column named path")
    paths = table.column(KEY)
    if paths.null_count:
        raise InputError(f"{where}: a row has no path; every row must name its image")
    if len(pc.unique(paths)) != len(paths):
        twice = next(c["values"] for c in pc.value_counts(paths).to_pylist() if c["counts"] > 1)
        raise InputError(f"{where}: path {twice!r} is given twice; one row per image")
    fields = [pa.field(KEY, pa.string())]
    for name in table.column_names:
        if name in PATH_COLUMNS and not (sizes and name in ("width", "height")):
            raise InputError(f"{where}: column {name!r} is derived from the path by clipzsl; rename it")
        if name != KEY:
            fields.append(pa.field(name, _column_type(name, table.schema.field(name).type, where)))
    return table.select([f.name for f in fields]).cast(pa.schema(fields))


def read_sidecar(csv_path: str | os.PathLike) -> Any:
    """A sidecar CSV of extra columns (pyarrow table), keyed by its `path` column; relative paths are
    taken from the CSV's folder and every path is resolved, as the index's keys are."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(csv_path)
    except (OSError, pa.ArrowInvalid) as err:
        raise InputError(f"{csv_path}: unreadable metadata CSV ({err}); give a CSV with a header row and a "
                         "path column") from err
    if KEY in table.column_names:
        folder = Path(csv_path).resolve().parent
        resolved = [None if p is None else str((folder / str(p)).resolve()) for p in table.column(KEY).to_pylist()]
        table = table.set_column(table.column_names.index(KEY), KEY, pa.array(resolved, pa.string()))
    return extra_table(table, str(csv_path))


def shard_columns(meta: Path, paths: Sequence[str]) -> Any:
    """The extra columns of a clip-retrieval metadata shard (all but image_path and resolved_path: caption,
    url, width, height... as img2dataset writes them; a `folder` or `name` is left out, as clipzsl derives
    those from the path), keyed by `paths` (its rows' index keys)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(meta)
    keep = [n for n in table.column_names if n not in ("image_path", "resolved_path", KEY, "folder", "name")]
    return extra_table(table.select(keep).append_column(KEY, pa.array(list(paths), pa.string())), str(meta),
                       sizes=True)


def check_schema(table: Any, where: str) -> None:
    """Refuse (StoreError) a stored metadata table whose key or path-derived columns are missing or of
    another type, whose extra columns are of a kind the filter cannot compare, or whose paths repeat."""
    import pyarrow.compute as pc

    for name, type_ in _types().items():
        if name not in table.column_names or table.schema.field(name).type != type_:
            raise StoreError(f"{where}: damaged metadata (column {name!r} missing or not {type_}); "
                             "run `clipzsl index repair` to rebuild it")
    try:
        for name in table.column_names[len(_types()):]:
            _column_type(name, table.schema.field(name).type, where)
    except InputError as err:
        raise StoreError(f"{err}; run `clipzsl index repair` to rebuild it") from err
    if table.column(KEY).null_count or len(pc.unique(table.column(KEY))) != len(table):
        raise StoreError(f"{where}: damaged metadata (a path missing or repeated); run `clipzsl index repair`")


def merged(current: Any, fresh: Any, extra: Any | None) -> Any:
    """`current` rows with `fresh` path-derived rows replacing or adding theirs, then `extra`'s columns set
    for its paths (other rows keep their values, or null in a new column); shard sizes fill width/height."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kept = current.filter(pc.invert(pc.is_in(current.column(KEY), value_set=fresh.column(KEY))))
    fresh = _with_columns(fresh, kept.schema)
    table = pa.concat_tables([kept, fresh.select(kept.column_names)]) if len(kept.schema) else fresh
    if extra is None:
        return table
    where = pc.index_in(table.column(KEY), value_set=extra.column(KEY))
    for name in extra.column_names[1:]:
        given = pc.take(extra.column(name), where)
        if name in table.column_names:
            given = pc.if_else(pc.is_valid(where), given, table.column(name).cast(given.type))
            table = table.set_column(table.column_names.index(name), name, given)
        else:
            table = table.append_column(pa.field(name, given.type), given)
    return table


def _with_columns(table: Any, schema: Any) -> Any:
    """`table` with a null column for each field of `schema` it lacks."""
    import pyarrow as pa

    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(len(table), field.type))
    return table


@dataclass
class _Mapped:
    """The table as read (for its noted crc) and each of its rows' global row in the store (-1: not live)."""

    crc: int
    span: tuple[int, int]
    table: Any
    rows: np.ndarray


class Metadata:
    """The metadata table of one image index's store: read (checked), updated, and filtered to rows."""

    def __init__(self, store: EmbeddingStore):
        self.store = store
        self._mapped: _Mapped | None = None

    @property
    def path(self) -> Path:
        return self.store.directory / METADATA_FILE

    def table(self) -> Any:
        """The stored table (pyarrow), checked against its noted size, checksum and schema; an empty table
        of the path-derived columns where none was written."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        state = self.store.state(METADATA_STATE)
        if not state:
            return pa.table({n: pa.array([], t) for n, t in _types().items()})
        size = self.path.stat().st_size if self.path.exists() else -1
        if size != int(state["bytes"]) or file_crc(self.path) != int(state["crc"]):
            raise StoreError(f"{self.path}: damaged metadata ({size} bytes, expected {state['bytes']}, or checksum "
                             f"mismatch); run `clipzsl index repair {self.store.directory}` to rebuild it")
        table = pq.read_table(self.path)
        check_schema(table, str(self.path))
        return table

    def columns(self) -> dict[str, str]:
        """Column name -> its kind (text, number, bool), as a filter compares it."""
        import pyarrow as pa

        schema = self.table().schema
        return {f.name: "bool" if pa.types.is_boolean(f.type) else "text" if pa.types.is_string(f.type) else "number"
                for f in schema}

    def update(self, fresh: Sequence[str], extra: Any | None = None, sizes: bool = True) -> int:
        """Bring the table up to the store's live keys: `fresh` keys (new or re-embedded) get their
        path-derived columns anew (`sizes`: read from their files), keys no longer live are dropped,
        and `extra` (a table keyed by `path`: `read_sidecar`, `shard_columns`) sets its columns for its
        paths; rows of paths not in the index are left out, with a notice. Returns the rows written."""
        import pyarrow.compute as pc

        with self.store.writing():
            live = self.store.keys()
            current = self.table()
            held = set(current.column(KEY).to_pylist())
            fresh = sorted({*fresh, *(k for k in live if k not in held)} & set(live))
            table = merged(current, path_columns(fresh, sizes), extra)
            table = table.filter(pc.is_in(table.column(KEY), value_set=_array(live)))
            if extra is not None and (unknown := len(extra) - int(pc.sum(pc.is_in(extra.column(KEY),
                                                                                  value_set=_array(live))).as_py() or 0)):
                logger.info("%d metadata rows name images that are not in the index; left out", unknown)
            self._write(table)
            return len(table)

    def rebuild(self) -> int:
        """Write the path-derived columns of every live key afresh (what a repair does with a damaged
        table; extra columns are lost, with a warning). Returns the rows written."""
        logger.warning("%s: rebuilding the path-derived metadata columns; extra columns are lost", self.path)
        with self.store.writing():
            self.store.set_state(METADATA_STATE, {})
        return self.update([])

    def problem(self) -> str | None:
        """What is wrong with the stored table, or None."""
        try:
            self.table()
        except (StoreError, OSError, ValueError) as err:
            return str(err)
        return None

    def _write(self, table: Any) -> None:
        """Write the table atomically and note its size and checksum (under the caller's writers' lock)."""
        import pyarrow.parquet as pq

        atomic_write(self.path, lambda f: pq.write_table(table, f))
        self.store.set_state(METADATA_STATE, {"bytes": self.path.stat().st_size, "crc": file_crc(self.path),
                                              "rows": len(table)})
        self._mapped = None

    def check(self, where: str) -> None:
        """Refuse (`clipzsl.where.FilterError`) a filter that does not parse or names a column or kind of value
        the table lacks, without evaluating it."""
        filters.check(filters.parse(where), self._current().table.schema, where)

    def allowed(self, where: str) -> Allowed:
        """The global rows whose metadata the filter `where` (`clipzsl.where`) holds true for."""
        mapped = self._current()
        chosen = matching(where, mapped.table) & (mapped.rows >= 0)
        return Allowed.of_rows(mapped.rows[chosen], mapped.span)

    def _current(self) -> _Mapped:
        """The table with each row's global row, read again when the table or the rows changed."""
        import pyarrow.compute as pc

        state, span = self.store.state(METADATA_STATE), self.store.row_span
        mapped = self._mapped
        if mapped is None or mapped.crc != int(state.get("crc", -1)) or mapped.span != span:
            keys, rows = self.store.key_rows()
            table = self.table() if state else path_columns(keys, sizes=False)  # an index from before metadata
            position = pc.index_in(table.column(KEY), value_set=_array(keys)).fill_null(-1).to_numpy()
            mapped = _Mapped(int(state.get("crc", -1)), span, table,
                             np.where(position >= 0, rows[np.maximum(position, 0)], -1))
            self._mapped = mapped
        return mapped


def _array(values: Iterable[str]) -> Any:
    import pyarrow as pa

    return pa.array(list(values), pa.string())
