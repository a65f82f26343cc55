"""Accuracy per query: MEKD (soft and hard) over budgets and seeds, on one teacher and generator.

Each (response, budget, seed) cell is a `b2kd distill` run directory under
``--out``; finished cells are read back, not re-run. Writes a CSV (and a PNG
curve when matplotlib is installed). Example, after `make demo`:

    .venv/bin/python benchmarks/query_efficiency.py --budgets 5000 10000 20000 --seeds 0 \
        --csv docs/results/query-efficiency-cpu.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from b2kd.core.config import load_config
from b2kd.pipeline import run_distill, run_evaluate

FIELDS = ["variant", "response", "budget", "seed", "student_acc", "student_acc_last", "dev_acc", "fidelity",
          "queries", "setup_queries", "bytes_sent", "seconds"]
KEY = ("variant", "response", "budget", "seed")


def run_cell(config: str, teacher: str, generator: str, response: str, budget: int, seed: int,
             out: Path, overrides: list[str] = (), variant: str = "default") -> dict:
    report = out / "report.json"
    if not report.is_file():
        cfg = load_config(config, overrides=[
            f"teacher.checkpoint={teacher}", f"deprivatize.generator={generator}",
            f"distill.response={response}", f"distill.budget={budget}", f"seed={seed}", f"out={out}",
            *overrides,
        ])
        summary = run_distill(cfg, out, log=lambda *_: None)
        run_evaluate(out, cfg)
        (out / "cell.json").write_text(json.dumps({"seconds": summary["seconds"]}))
    result = json.loads(report.read_text())
    seconds = json.loads((out / "cell.json").read_text())["seconds"]
    return {"variant": variant, "response": response, "budget": budget, "seed": seed,
            "student_acc": result["student_acc"], "student_acc_last": result["latest"]["acc"],
            "dev_acc": result.get("dev_acc"), "fidelity": result["fidelity"], "queries": result["queries"],
            "setup_queries": setup_queries(generator), "bytes_sent": result["bytes_sent"],
            "seconds": seconds}


def setup_queries(generator: str) -> int | str:
    """The queries deprivatization paid to make this generator (its run's report), or ''."""
    report = Path(generator).parent / "report.json"
    return json.loads(report.read_text()).get("queries", "") if report.is_file() else ""


def merged(rows: list[dict], path: Path) -> list[dict]:
    """The rows of ``path`` that this sweep did not make (older variants and cells), then ``rows``."""
    if not path.is_file():
        return rows
    mine = {tuple(str(r[k]) for k in KEY) for r in rows}
    with open(path, newline="") as fh:
        kept = [r for r in csv.DictReader(fh) if tuple(r[k] for k in KEY) not in mine]
    return kept + rows


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path, variants: list[str] | None = None) -> None:
    """One curve per (variant, response), mean over seeds; only ``variants`` when given."""
    if variants is not None:
        rows = [r for r in rows if r.get("variant", "default") in variants]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for variant, response in sorted({(r.get("variant", "default"), r["response"]) for r in rows}):
        mine = [r for r in rows if r.get("variant", "default") == variant and r["response"] == response]
        budgets = sorted({int(r["budget"]) for r in mine})
        means = [statistics.mean(float(r["student_acc"]) for r in mine if int(r["budget"]) == b)
                 for b in budgets]
        label = f"MEKD {response}" + ("" if variant == "default" else f" ({variant})")
        ax.plot(budgets, [100 * m for m in means], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("queries")
    ax.set_ylabel("student test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--teacher", default="runs/demo/teacher/teacher.pt")
    parser.add_argument("--generator", default="runs/demo/deprivatize/generator.pt")
    parser.add_argument("--responses", nargs="+", default=["soft", "hard"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[5000, 10000, 20000, 50000, 100000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/query-efficiency"))
    parser.add_argument("--csv", type=Path, default=Path("docs/results/query-efficiency-cpu.csv"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every cell (e.g. device=cuda distill.epochs=20)")
    parser.add_argument("--variant", default="default", help="name of this setting in the CSV")
    parser.add_argument("--plot-variants", nargs="+", default=None, metavar="VARIANT",
                        help="variants the PNG draws (default: 'default' and this sweep's)")
    args = parser.parse_args()

    rows: list[dict] = []
    for response in args.responses:
        for budget in args.budgets:
            for seed in args.seeds:
                cell = f"{response}-{budget}-s{seed}"
                if args.variant != "default":
                    cell = f"{args.variant}-{cell}"
                row = run_cell(args.config, args.teacher, args.generator, response, budget, seed,
                               args.out / cell, args.set, args.variant)
                print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in row.items()), flush=True)
                rows.append(row)
                # after every cell, so an interrupted sweep keeps its rows; other variants' rows stay
                write_csv(merged(rows, args.csv), args.csv)
    plot(merged(rows, args.csv), args.csv.with_suffix(".png"),
         args.plot_variants or sorted({"default", args.variant}))


if __name__ == "__main__":
    main()
