"""The summary of a benchmark folder, whole or cut short: `python -m benchmarks.summarize DIR`.

Joins the rows of every CSV under DIR (phases of scripts/gpu_check.sh write to the same CSVs
with different providers, so a phase that ran only `compiled` finds its `reference` in another),
keeps the last row of a provider at a point (a repeat replaces a timing), recomputes the
speedups over the joined rows, and prints, last because the end of the output is what a
truncated log keeps: every row, the short table (one line per op, mode and point, a column per
provider), the targets of each benchmark, the phases and test counts the script logged, and
one line of totals. A truncated last CSV line (a run killed mid-write) is skipped. Standard
library only (no torch, no GPU): it runs in a second wherever the CSVs are.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from benchmarks import targets
from benchmarks.tables import (COLUMNS, SHAPE_COLUMNS, add_speedups, point_key, print_table, print_targets,
                               shape_label)

FLOAT_COLUMNS = ("median_ms", "p20_ms", "p80_ms", "graph_ms", "gbps", "tflops", "floor_ms", "pct_floor",
                 "speedup_vs_eager", "speedup_vs_compiled", "speedup_vs_compiled_fused", "first_call_s", "max_err",
                 "peak_bw")
INT_COLUMNS = SHAPE_COLUMNS + ("bytes", "flops")
# Which CSV a benchmark writes (its stem, before a sibling's "-<hash>"), and where its targets are.
BENCHES = {"bench_kernels": "kernels", "bench_attention": "attention"}
TEST_RESULT = re.compile(r"\d+ (passed|failed|error|errors|skipped|deselected)\b")


def _parse(raw: Dict[str, str]) -> Dict[str, object]:
    row: Dict[str, object] = {k: raw.get(k) or "" for k in COLUMNS}
    for column in INT_COLUMNS:
        if str(row[column]).lstrip("-").isdigit():
            row[column] = int(row[column])
    for column in FLOAT_COLUMNS:
        if row[column] != "":
            try:
                row[column] = float(row[column])
            except ValueError:
                row[column] = ""
    return row


def read_rows(folder: Path) -> Tuple[Dict[str, List[Dict[str, object]]], List[str]]:
    """Rows per benchmark ("kernels", "attention", or a CSV's stem), and what was skipped and why."""
    rows: Dict[str, List[Dict[str, object]]] = {}
    skipped = []
    for path in sorted(folder.rglob("*.csv")):
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"op", "provider", "mode", "median_ms"} <= set(reader.fieldnames):
                skipped.append(f"{path.name}: not a benchmark CSV (header {reader.fieldnames})")
                continue
            bench = BENCHES.get(path.stem.split("-")[0], path.stem)
            for raw in reader:
                if None in raw or any(v is None for v in raw.values()):   # a line cut mid-write
                    skipped.append(f"{path.name}: an incomplete line")
                    continue
                rows.setdefault(bench, []).append(_parse(raw))
    return rows, skipped


def latest(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """One row per provider and point: the last one written, in first-seen order."""
    kept: Dict[Tuple, Dict[str, object]] = {}
    for r in rows:
        kept[point_key(r) + (r["provider"],)] = r
    return list(kept.values())


def print_short_table(rows: Sequence[Dict[str, object]], file=None) -> None:
    """One line per op, mode, dtype and shape: every provider's median (ms), graph replay in brackets."""
    file = file or sys.stdout
    points: Dict[Tuple, List[str]] = {}
    labels = {}
    for r in rows:
        if r["mode"] == "-":
            continue
        key = point_key(r)
        labels[key] = f"{r['op']} {r['mode']} {r['dtype']} {shape_label(r)}"
        if r["error"] or r["median_ms"] == "":
            cell = f"{r['provider']} error"
        else:
            cell = f"{r['provider']} {r['median_ms']:.4f}" + (f" [{r['graph_ms']:.4f}]" if r["graph_ms"] != "" else "")
        points.setdefault(key, []).append(cell)
    for key, cells in points.items():
        print(f"{labels[key]}: " + " | ".join(cells), file=file)


def print_targets_of(bench: str, rows: Sequence[Dict[str, object]], file=None) -> None:
    """The bench's own targets at its bf16 target point."""
    point, chosen = (targets.KERNELS_POINT, targets.KERNELS_TARGETS) if bench == "kernels" else \
        (targets.ATTENTION_POINT, targets.ATTENTION_TARGETS)
    where = targets.where(point)
    title = f"Targets of bench_{bench} at " + ", ".join(f"{k}={v}" for k, v in where.items())
    print_targets(rows, chosen, where, title, file=file)


def print_logs(folder: Path, file=None) -> None:
    """The script's phase log, and each test log's pytest summary line (or that it has none)."""
    file = file or sys.stdout
    phases = folder / "phases.log"
    if phases.exists():
        print("phases:", file=file)
        for line in phases.read_text().splitlines():
            print(f"  {line}", file=file)
    for log in sorted(folder.glob("tests*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines() if TEST_RESULT.search(line)]
        print(f"{log.name}: " + (lines[-1].strip("= ") if lines else "no pytest summary (cut before it)"), file=file)


def summarize(folder: Path, file=None) -> int:
    """Prints the summary; returns how many rows it joined."""
    file = file or sys.stdout
    per_bench, skipped = read_rows(folder)
    total = errors = 0
    for bench, rows in per_bench.items():
        rows = latest(rows)
        add_speedups(rows)
        total += len(rows)
        errors += sum(1 for r in rows if r["error"])
        print(f"== {bench}: {len(rows)} rows", file=file)
        print_table(rows, file=file)
        print(file=file)
        print_short_table(rows, file=file)
        print(file=file)
        if bench in BENCHES.values():
            print_targets_of(bench, rows, file=file)
            print(file=file)
    for line in skipped:
        print(f"skipped {line}", file=file)
    print_logs(folder, file=file)
    print(f"summary: {total} rows ({errors} with errors) from {folder}", file=file)
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summarize", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the folder of the CSVs and logs (searched recursively for *.csv)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        parser.error(f"folder: expected a directory, got {args.folder!r}")
    summarize(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
