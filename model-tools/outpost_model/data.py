"""Reading `outpost export` CSV files.

The export (agent/src/store/reader.rs, ``Reader::export_csv``) writes a header
``ts_ms,NAME,NAME,...`` (feature names sorted, CSV-quoted only when they hold
a comma, quote or newline), then one row per stored feature vector: the unix
time in ms, then one cell per feature. A cell is EMPTY when that vector had
no such feature (the feature set changed while the agent ran); values are
f32 printed in Rust's shortest form, which may be ``NaN``, ``inf`` or
``-inf``. Empty cells and non-finite values are both read as NaN here.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field

import numpy as np


class DataError(Exception):
    """Bad input data: missing file, malformed CSV, no usable column."""


@dataclass
class Table:
    """A CSV read as floats: ``ts`` (first column) and ``columns`` x ``values``."""

    path: str
    ts_name: str
    ts: np.ndarray  # float64, one per row
    columns: list[str]
    values: np.ndarray  # float64 [rows, columns], NaN where empty / non-finite


def _cell(text: str) -> float:
    text = text.strip()
    if not text:
        return math.nan
    v = float(text)  # "NaN", "inf", "-inf" parse too
    return v if math.isfinite(v) else math.nan


def read_table(path: str) -> Table:
    """Reads an export-like CSV: the first column is the time stamp (ms, or
    anything numeric), the others numeric feature columns."""
    try:
        f = open(path, newline="")
    except OSError as e:
        raise DataError(f"{path}: {e.strerror}") from None
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file") from None
        except csv.Error as e:
            raise DataError(f"{path}:1: {e}") from None
        if len(header) < 2:
            raise DataError(f"{path}:1: need a time stamp column and at least one feature column")
        if len(set(header)) != len(header):
            raise DataError(f"{path}:1: duplicate column names")
        ts, rows = [], []
        try:
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}:{line}: {len(row)} cells, the header has {len(header)}")
                try:
                    ts.append(float(row[0]))
                    rows.append([_cell(c) for c in row[1:]])
                except ValueError as e:
                    raise DataError(f"{path}:{line}: not a number: {e}") from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: {e}") from None
    if not rows:
        raise DataError(f"{path}: no data rows")
    return Table(path, header[0], np.asarray(ts, dtype=np.float64), header[1:],
                 np.asarray(rows, dtype=np.float64))


@dataclass
class Selection:
    """The columns kept for training, and why the others were dropped."""

    names: list[str]
    X: np.ndarray  # float64 [rows, len(names)], no NaN
    ts: np.ndarray
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> names
    rows_dropped: int = 0

    def report(self) -> str:
        lines = [f"{len(self.names)} features, {len(self.X)} rows"]
        for reason, names in self.dropped.items():
            if names:
                shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
                lines.append(f"dropped {len(names)} column(s) {reason}: {shown}")
        if self.rows_dropped:
            lines.append(f"dropped {self.rows_dropped} row(s) with a missing value")
        return "\n".join(lines)


#: A column missing in more than this share of the rows is dropped rather
#: than costing all those rows.
MAX_MISSING_SHARE = 0.2


def select_features(table: Table, pattern: str | None = None,
                    exclude: tuple[str, ...] = ()) -> Selection:
    """Keeps the columns matching ``pattern`` (``re.search``), drops the
    all-missing, mostly-missing and constant ones, then the rows that still
    have a missing value."""
    if pattern is not None:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise DataError(f"--features: bad regular expression: {e}") from None
    dropped = {"not matching --features": [], "with no value": [],
               f"missing in more than {MAX_MISSING_SHARE:.0%} of rows": [],
               "that are constant": []}
    keep = []
    for j, name in enumerate(table.columns):
        if name in exclude:
            continue
        if pattern is not None and not rx.search(name):
            dropped["not matching --features"].append(name)
            continue
        col = table.values[:, j]
        ok = ~np.isnan(col)
        if not ok.any():
            dropped["with no value"].append(name)
        elif (~ok).mean() > MAX_MISSING_SHARE:
            dropped[f"missing in more than {MAX_MISSING_SHARE:.0%} of rows"].append(name)
        else:
            keep.append(j)
    # Constant is judged on the rows that will be used.
    if keep:
        sub = table.values[:, keep]
        rows_ok = ~np.isnan(sub).any(axis=1)
        sub = sub[rows_ok]
        still = []
        for k, j in enumerate(keep):
            col = sub[:, k]
            # Constant in f32, which is what the model sees.
            if len(col) == 0 or np.ptp(col.astype(np.float32)) == 0:
                dropped["that are constant"].append(table.columns[j])
            else:
                still.append(j)
        keep = still
    if not keep:
        raise DataError(f"{table.path}: no usable feature column (all missing, constant or "
                        "filtered out)")
    X = table.values[:, keep]
    rows_ok = ~np.isnan(X).any(axis=1)
    sel = Selection([table.columns[j] for j in keep], X[rows_ok], table.ts[rows_ok], dropped,
                    int((~rows_ok).sum()))
    if len(sel.X) < 2:
        raise DataError(f"{table.path}: fewer than 2 complete rows")
    return sel


def columns(table: Table, names: list[str]) -> np.ndarray:
    """The given columns, in that order (NaN kept); a missing one is an error."""
    index = {n: j for j, n in enumerate(table.columns)}
    missing = [n for n in names if n not in index]
    if missing:
        raise DataError(f"{table.path}: the model's feature(s) not in the file: "
                        + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    return table.values[:, [index[n] for n in names]]


_WINDOW = re.compile(r"\.(mean|min|max|std|last|slope)_(\d+)s$")


def window_of(names: list[str]) -> int | None:
    """The feature window in seconds shared by all names, else None."""
    windows = set()
    for n in names:
        m = _WINDOW.search(n)
        if not m:
            return None
        windows.add(int(m.group(2)))
    return windows.pop() if len(windows) == 1 else None


def step_of(ts_ms: np.ndarray) -> int | None:
    """The median step between rows in whole seconds (at least 1), else None."""
    if len(ts_ms) < 2:
        return None
    d = np.diff(np.sort(ts_ms))
    d = d[d > 0]
    if len(d) == 0:
        return None
    return max(1, int(round(float(np.median(d)) / 1000.0)))
