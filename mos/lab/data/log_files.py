"""Reading an interaction log's columns from a CSV, TSV or Parquet file, after checking that the
file is what its name says.

Before any row is read: an empty file, a binary file (Parquet, gzip, zip) named `.csv`/`.tsv`, a
text file named `.parquet`, and a header without the id columns each stop with one `InputError`
that says what was found. A UTF-8 byte-order mark (spreadsheet exports write one) is not part of
the first column's name, so it is stripped. `mos.lab.data.logs` turns the columns into a dataset.

Ids (user, item, category) come out as one canonical type whatever the format: the text of the
id, as a CSV writes it. A Parquet file's integer 17 (or integral float 17.0) is "17", so a model
trained on a CSV log scores the same events stored as Parquet, and the reverse.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from mos.lab.errors import InputError, MissingPackage

# The first bytes of files a log is sometimes confused with.
_MAGIC = {b"PAR1": "a Parquet file", b"\x1f\x8b": "gzip-compressed", b"PK\x03\x04": "a zip archive (or .xlsx)"}
_SUFFIX = {"a Parquet file": ".parquet"}


def read_columns(path: Path, kind: str, wanted: dict):
    """(header, role -> list of values or None, fields per row, line numbers) of the log at `path`;
    `kind` is "csv", "tsv" or "parquet", `wanted` maps a role to its column name."""
    _check_content(path, kind)
    return (_read_parquet if kind == "parquet" else _read_text)(path, kind, wanted)


def _check_content(path: Path, kind: str) -> None:
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"data.source: {path} is empty (0 bytes); expected a header line naming the columns, "
                         f"then one row per event")
    with open(path, "rb") as stream:
        start = stream.read(4)
    found = next((what for magic, what in _MAGIC.items() if start.startswith(magic)), None)
    if kind == "parquet":
        if found != "a Parquet file":
            seen = found or f"bytes {start!r}, not the Parquet magic b'PAR1'"
            raise InputError(f"data.source: {path} is named .parquet but is {seen}; a text log needs the "
                             f"suffix .csv or .tsv")
    elif found is not None:
        hint = f"; rename it to {path.with_suffix(_SUFFIX[found]).name}" if found in _SUFFIX else \
            "; decompress or convert it to CSV, TSV or Parquet first"
        raise InputError(f"data.source: {path} is named {path.suffix} but is {found} (it starts with {start!r}){hint}")


def _present(header: list, wanted: dict, path: Path, delimiter: str = "") -> dict:
    """Role -> column index of the wanted columns the header has; the ids are required."""
    for role in ("user", "item"):
        if wanted[role] not in header:
            raise InputError(f"data.logs.{role}_column: expected a column {wanted[role]!r} in {path}, got columns "
                             f"{header}{_delimiter_hint(header, delimiter)}")
    for role, name in wanted.items():
        at = [i + 1 for i, column in enumerate(header) if column == name]
        if len(at) > 1:      # which one is meant cannot be told: reading the first would be a guess
            raise InputError(f"data.logs.{role}_column: expected one column {name!r} in {path}, got it "
                             f"{len(at)} times (fields {', '.join(map(str, at))})")
    return {role: header.index(name) for role, name in wanted.items() if name in header}


def _delimiter_hint(header: list, delimiter: str) -> str:
    """A header read as one column often means the file uses another delimiter than its suffix says."""
    if len(header) != 1 or not delimiter:
        return ""
    for other, name in (("\t", "tabs"), (",", "commas"), (";", "semicolons")):
        if other != delimiter and other in header[0]:
            return f" (one column: the header is separated by {name}, not by {delimiter!r})"
    return ""


ID_ROLES = ("user", "item", "category")


def canonical_id(value):
    """An id as the text a CSV holds: strings stripped (empty: None), integers and integral floats
    in decimal ("17"), anything else by str(); None, NaN and inf are no id (None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, float):
        if not math.isfinite(value):    # a Parquet null-like NaN: no id, as a blank CSV field
            return None
        if value.is_integer():
            return str(int(value))
    return str(value)


def _read_text(path: Path, kind: str, wanted: dict):
    delimiter = "," if kind == "csv" else "\t"
    # utf-8-sig: a byte-order mark would otherwise become part of the first column's name.
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream, delimiter=delimiter)
        try:
            header = [name.strip() for name in next(reader, [])]
            if not any(header):
                raise InputError(f"data.source: {path} has no header on line 1; expected the column names "
                                 f"({', '.join(wanted.values())}), separated by {delimiter!r}")
            index = _present(header, wanted, path, delimiter)
            columns = {role: [] for role in index}
            fields, lines = [], []
            last_line = reader.line_num
            for row in reader:
                first_line, last_line = last_line + 1, reader.line_num
                if not row:          # blank lines are layout, not rows
                    continue
                if last_line > first_line:
                    _check_line_breaks(row, index, len(header), delimiter, path, first_line, last_line)
                lines.append(reader.line_num)
                fields.append(len(row))
                for role, at in index.items():
                    value = row[at].strip() if at < len(row) else ""
                    columns[role].append(value or None)
        except UnicodeDecodeError as err:
            raise InputError(f"data.source: {path} is not UTF-8 text (byte {err.object[err.start]:#04x} near line "
                             f"{reader.line_num + 1}); save it as UTF-8") from None
        except csv.Error as err:     # a field past the csv module's limit (131,072 characters), a NUL byte
            raise InputError(f"data.source: {path} line {reader.line_num}: not a readable "
                             f"{kind.upper()} row ({err})") from None
    return header, columns, np.asarray(fields, dtype=np.int64), np.asarray(lines, dtype=np.int64)


def _check_line_breaks(row: list, index: dict, width: int, delimiter: str, path: Path, first: int,
                       last: int) -> None:
    """A row over several lines is legal CSV (a quoted review or title holding line breaks), but an
    id, time or label never holds one, and a field holding lines that look like rows of the log is
    an unclosed quote that swallowed them: both are refused, naming the lines."""
    swallowed = any(text.count(delimiter) >= width - 1 for field in row for text in field.splitlines()[1:])
    if swallowed or any(at < len(row) and ("\n" in row[at] or "\r" in row[at]) for at in index.values()):
        raise InputError(f"data.source: {path} line {first}: a quoted field runs over lines {first}-{last} (an "
                         f"unclosed quote?); ids, times and labels hold no line breaks")


def _read_parquet(path: Path, kind: str, wanted: dict):
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise MissingPackage(f"data.source: reading the Parquet file {path} needs the package pyarrow, which "
                             f"is not installed (pip install pyarrow, or pip install 'mixture-of-sequence[parquet]')") from None
    import pyarrow

    try:
        schema = parquet.read_schema(path)
        header = list(schema.names)
        index = _present(header, wanted, path)
        table = parquet.read_table(path, columns=[header[at] for at in index.values()])
    except (pyarrow.ArrowException, OSError) as err:      # truncated, or not Parquet inside
        raise InputError(f"data.source: {path} is not a readable Parquet file ({err})") from None
    columns = {}
    for role, at in index.items():
        kind_of = table.schema.field(header[at]).type
        if pyarrow.types.is_nested(kind_of):     # a list or struct cell is no id, time or label
            raise InputError(f"data.logs.{role}_column: expected a column of plain values in {path}, got "
                             f"{header[at]!r} of type {kind_of}")
        values = table.column(header[at]).to_pylist()
        convert = canonical_id if role in ID_ROLES else (lambda v: v.strip() or None if isinstance(v, str) else v)
        columns[role] = [convert(value) for value in values]
    return (header, columns, np.full(table.num_rows, len(header), dtype=np.int64),
            np.arange(1, table.num_rows + 1, dtype=np.int64))
