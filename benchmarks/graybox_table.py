"""The gray-box table: MEKD on soft, hard and soft+embedding answers, per query and per MB.

Reads the results.csv of `b2kd bench configs/bench-mnist-cpu.yaml` (MEKD's soft and hard cells)
and of `b2kd bench configs/bench-mnist-graybox.yaml` (its soft+embedding cells: the same cell
configs but for the response) and prints a Markdown table, mean ± std over seeds: test accuracy,
queries (paid for the pool; deprivatization's setup queries, the same for every row, apart), MB
received by the edge per cell, and accuracy per 1,000 queries and per MB received.

    .venv/bin/python benchmarks/graybox_table.py runs/bench-mnist-cpu/results.csv \\
        runs/bench-mnist-graybox/results.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics


def read(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path, newline="") as fh:
            rows += [r for r in csv.DictReader(fh) if r["method"] == "mekd" and r["status"] == "ok"
                     and r["gap"] == "none"]
    return rows


def fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean = scale * statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| answers | budget | seeds | test acc (%) | MB received | acc / 1k queries | acc / MB |",
             "|---|---|---|---|---|---|---|"]
    kinds = [k for k in ("soft", "hard", "soft+embedding") if any(r["response"] == k for r in rows)]
    for budget in sorted({int(r["budget"]) for r in rows}):
        for kind in kinds:
            cell = [r for r in rows if r["response"] == kind and int(r["budget"]) == budget]
            if not cell:
                continue
            acc = [float(r["student_acc"]) for r in cell]
            mb = [int(r["bytes_received"]) / 1e6 for r in cell]
            per_kq = [a / (int(r["queries"]) / 1000) for a, r in zip(acc, cell, strict=True)]
            per_mb = [a / m for a, m in zip(acc, mb, strict=True)]
            lines.append(f"| {kind} | {budget:,} | {len(cell)} | {fmt(acc)} | {statistics.mean(mb):.2f} |"
                         f" {fmt(per_kq, 100, 3)} | {fmt(per_mb, 100, 2)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.csv files of the two benches")
    print(table(read(parser.parse_args().results)))


if __name__ == "__main__":
    main()
