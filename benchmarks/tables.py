"""Rows, CSV files and printed tables: what every benchmark writes and what `summarize` reads.

Owns the CSV columns, appending rows to a CSV, the speedups of a case's providers over the
baselines, the printed tables and the targets. Standard library only, so that the summary of a
run (benchmarks/summarize.py) works where torch cannot even be imported.
"""
from __future__ import annotations

import csv
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

MODES = ("fwd", "bwd", "fwd+bwd")
COLUMNS = (
    "op", "provider", "mode", "dtype", "B", "L", "T", "S", "rows", "d", "K", "top_k",
    "median_ms", "p20_ms", "p80_ms", "graph_ms", "bytes", "flops", "gbps", "tflops", "floor_ms", "pct_floor",
    "speedup_vs_eager", "speedup_vs_compiled", "speedup_vs_compiled_fused", "first_call_s", "max_err", "error",
    "graph_note", "card", "device", "peak_bw", "peak_source", "timing", "date", "torch", "triton", "python",
    "git_commit", "note",
)
SHAPE_COLUMNS = ("B", "L", "T", "S", "rows", "d", "K", "top_k")
# (column, provider): every row's speedup over these baselines, same op, mode, dtype and shape.
SPEEDUP_BASELINES = (("speedup_vs_eager", "reference"), ("speedup_vs_compiled", "compiled"),
                     ("speedup_vs_compiled_fused", "compiled_fused"))


def point_key(row: Dict[str, object]) -> Tuple:
    """What must agree for two rows to time the same work: op, mode, dtype and shape."""
    return (row["op"], row["mode"], row["dtype"]) + tuple(str(row[k]) for k in SHAPE_COLUMNS)


def add_speedups(rows: Sequence[Dict[str, object]]) -> None:
    """Set the speedup columns of every timed row from the baselines' rows among `rows` (the
    last row of a provider wins: a repeat replaces an earlier timing). A row whose baseline is
    missing keeps its column as it was."""
    baselines: Dict[Tuple, Dict[str, float]] = {}
    for r in rows:
        if r["median_ms"] not in ("", None) and not r["error"]:
            baselines.setdefault(point_key(r), {})[r["provider"]] = float(r["median_ms"])
    for r in rows:
        if r["median_ms"] in ("", None) or not float(r["median_ms"]):
            continue
        timed = baselines.get(point_key(r), {})
        for column, provider in SPEEDUP_BASELINES:
            if timed.get(provider):
                r[column] = timed[provider] / float(r["median_ms"])


def describe_error(exc: BaseException) -> str:
    """An error column: the exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _csv_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def append_csv(path, rows: Sequence[Dict[str, object]]) -> Path:
    """Append rows to `path`, writing the header when the file is new. A file written with other
    columns is left alone: the rows go to a sibling named after the column set."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(COLUMNS):
            tag = hashlib.sha1(",".join(COLUMNS).encode()).hexdigest()[:8]
            sibling = path.with_name(f"{path.stem}-{tag}{path.suffix}")
            print(f"append_csv: {path} has other columns; writing to {sibling}", file=sys.stderr)
            path = sibling
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows({k: _csv_value(r[k]) for k in COLUMNS} for r in rows)
    return path


def _count(n) -> str:
    if n == "":
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(n)


def shape_label(row: Dict[str, object]) -> str:
    return f"B={row['B']} L={row['L']} T={_count(row['T'])} d={row['d']} K={row['K']} k={row['top_k']}"


def _fmt(value, spec: str) -> str:
    return "-" if value == "" or value is None else format(value, spec)


def _print_aligned(header: Sequence[str], lines: Sequence[Sequence[str]], right: Sequence[bool], file) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]

    def fmt(cells):
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()
    print(fmt(header), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for cells in lines:
        print(fmt(cells), file=file)


def print_table(rows: Sequence[Dict[str, object]], file=None) -> None:
    file = file or sys.stdout
    if not rows:
        print("(no rows)", file=file)
        return
    notes = sorted({str(r["note"]) for r in rows if r["note"]})
    if notes:
        print("NOTE: " + " | ".join(notes), file=file)
    header = ("op", "mode", "dtype", "shape", "provider", "ms", "graph ms", "GB/s", "TFLOP/s", "% floor", "x eager",
              "x compiled", "x fused", "error / graph note")
    lines = [(r["op"], r["mode"], r["dtype"], shape_label(r), r["provider"], _fmt(r["median_ms"], ".4f"),
              _fmt(r["graph_ms"], ".4f"), _fmt(r["gbps"], ".1f"), _fmt(r["tflops"], ".2f"), _fmt(r["pct_floor"], ".1f"),
              _fmt(r["speedup_vs_eager"], ".2f"), _fmt(r["speedup_vs_compiled"], ".2f"),
              _fmt(r["speedup_vs_compiled_fused"], ".2f"), str(r["error"] or r["graph_note"])[:70])
             for r in rows]
    _print_aligned(header, lines, (False,) * 5 + (True,) * 8 + (False,), file)


@dataclass(frozen=True)
class Target:
    """A goal on one row: `metric` (a row column) of op/mode/provider must reach `minimum`.

    With `versus` = (op, provider) the measured value is instead that row's median over this
    row's (same mode and point): a speedup over a provider or an op the harness does not compare
    with. `at` overrides entries of the target point for this target (e.g. another L)."""
    label: str
    op: str
    mode: str
    provider: str
    metric: str
    minimum: float
    unit: str = ""
    versus: Optional[Tuple[str, str]] = None
    at: Tuple[Tuple[str, object], ...] = ()


def evaluate_targets(rows: Sequence[Dict[str, object]], targets: Sequence[Target],
                     where: Dict[str, object]) -> List[Tuple[Target, Optional[float], str]]:
    """(target, measured value or None, "PASS"/"MISS") for the rows matching `where` (e.g. the
    dtype and shape of the target point)."""
    def find_row(op, provider, mode, point):
        match = [r for r in rows if r["op"] == op and r["mode"] == mode and r["provider"] == provider
                 and all(r[k] == v for k, v in point.items())]
        return match[0] if match else None

    results = []
    for t in targets:
        point = {**where, **dict(t.at)}
        row = find_row(t.op, t.provider, t.mode, point)
        if t.versus is None:
            value = row[t.metric] if row is not None and row[t.metric] != "" else None
        else:
            other = find_row(*t.versus, t.mode, point)
            timed = row is not None and other is not None and row["median_ms"] not in ("", 0) \
                and other["median_ms"] != ""
            value = other["median_ms"] / row["median_ms"] if timed else None
        results.append((t, value, "PASS" if value is not None and value >= t.minimum else "MISS"))
    return results


def print_targets(rows: Sequence[Dict[str, object]], targets: Sequence[Target], where: Dict[str, object],
                  title: str, file=None) -> List[Tuple[Target, Optional[float], str]]:
    file = file or sys.stdout
    results = evaluate_targets(rows, targets, where)
    print(title, file=file)
    lines = [(t.label, f">= {t.minimum:g}{t.unit}", "n/a" if v is None else f"{v:.2f}{t.unit}", status)
             for t, v, status in results]
    _print_aligned(("target", "goal", "measured", "status"), lines, (False, True, True, False), file)
    return results


class CsvSink:
    """`run_case`'s emit: appends each batch of rows to a CSV as it comes, so a run cut short
    keeps every provider already timed. `path` follows append_csv (a sibling for other columns)."""

    def __init__(self, path):
        self.path = Path(path)

    def __call__(self, rows: Sequence[Dict[str, object]]) -> None:
        if rows:
            self.path = append_csv(self.path, rows)
