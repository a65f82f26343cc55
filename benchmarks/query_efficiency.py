"""Accuracy per query: MEKD (soft and hard) over budgets and seeds, on one teacher and generator.

Each (response, budget, seed) cell is a `b2kd distill` run directory under
``--out``; finished cells are read back, not re-run. Writes a CSV (and a PNG
curve when matplotlib is installed). Example, after `make demo`:

    .venv/bin/python benchmarks/query_efficiency.py --budgets 5000 10000 20000 --seeds 0 \
        --csv docs/performance/query-efficiency.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from b2kd.config import load_config
from b2kd.pipeline import run_distill, run_evaluate

FIELDS = ["response", "budget", "seed", "student_acc", "student_acc_last", "fidelity", "queries",
          "bytes_sent", "seconds"]


def run_cell(config: str, teacher: str, generator: str, response: str, budget: int, seed: int,
             out: Path) -> dict:
    report = out / "report.json"
    if not report.is_file():
        cfg = load_config(config, overrides=[
            f"teacher.checkpoint={teacher}", f"deprivatize.generator={generator}",
            f"distill.response={response}", f"distill.budget={budget}", f"seed={seed}", f"out={out}",
        ])
        summary = run_distill(cfg, out, log=lambda *_: None)
        run_evaluate(out, cfg)
        (out / "cell.json").write_text(json.dumps({"seconds": summary["seconds"]}))
    result = json.loads(report.read_text())
    seconds = json.loads((out / "cell.json").read_text())["seconds"]
    return {"response": response, "budget": budget, "seed": seed,
            "student_acc": result["student_acc"], "student_acc_last": result["latest"]["acc"],
            "fidelity": result["fidelity"], "queries": result["queries"],
            "bytes_sent": result["bytes_sent"], "seconds": seconds}


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for response in sorted({r["response"] for r in rows}):
        budgets = sorted({r["budget"] for r in rows if r["response"] == response})
        means = [sum(r["student_acc"] for r in rows if r["response"] == response and r["budget"] == b)
                 / sum(1 for r in rows if r["response"] == response and r["budget"] == b) for b in budgets]
        ax.plot(budgets, [100 * m for m in means], marker="o", label=f"MEKD {response}")
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
    parser.add_argument("--csv", type=Path, default=Path("docs/performance/query-efficiency.csv"))
    args = parser.parse_args()

    rows = []
    for response in args.responses:
        for budget in args.budgets:
            for seed in args.seeds:
                row = run_cell(args.config, args.teacher, args.generator, response, budget, seed,
                               args.out / f"{response}-{budget}-s{seed}")
                print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in row.items()), flush=True)
                rows.append(row)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.csv.with_suffix(".png"))


if __name__ == "__main__":
    main()
