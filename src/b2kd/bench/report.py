"""`b2kd report`: a bench's results as a Markdown table (mean +- std over seeds) and PNG plots.

Plots, one pair per distribution gap: student accuracy against queries and
against MB sent, one line per method and response kind, with the teacher's
accuracy as a dashed reference line. White-box methods are labelled as such
everywhere. Plots need matplotlib (``pip install b2kd[plots]``); without it
the table is still written.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from b2kd.core.config import ConfigError


def load_rows(bench_dir: str | Path) -> list[dict]:
    path = Path(bench_dir) / "results.json"
    if not path.is_file():
        raise ConfigError(f"{bench_dir} holds no bench results (no results.json); run `b2kd bench` first")
    return json.loads(path.read_text())


def label(row: dict) -> str:
    name = row["method"].upper() + (" (white-box)" if row.get("white_box") else "")
    return f"{name} {row['response']}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (gap, method, response, budget): means and stds over the finished seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["gap"], row["method"], row["response"], row["budget"])].append(row)
    lines = []
    for (gap, method, response, budget), group in groups.items():
        ok = [r for r in group if r.get("status") == "ok"]
        line = {"gap": gap, "method": method, "response": response, "budget": budget,
                "label": label(group[0]), "seeds": len(ok), "failed": len(group) - len(ok)}
        if ok:
            line["acc"] = _mean_std([r["student_acc"] for r in ok])
            line["acc_last"] = _mean_std([r["student_acc_last"] for r in ok])
            fid = [r["fidelity"] for r in ok if r.get("fidelity") is not None]
            line["fidelity"] = _mean_std(fid) if fid else None
            dev = [r["dev_acc"] for r in ok if r.get("dev_acc") not in (None, "")]
            line["dev"] = _mean_std([float(v) for v in dev]) if dev else None
            gaps = [float(r["synthetic_gap"]) for r in ok if r.get("synthetic_gap") not in (None, "")]
            line["synthetic_gap"] = statistics.mean(gaps) if gaps else None
            line["setup"] = statistics.mean(float(r.get("setup_queries") or 0) for r in ok)
            line["queries"] = statistics.mean(r["queries"] for r in ok)
            line["mb_sent"] = statistics.mean(r["bytes_sent"] for r in ok) / 1e6
            line["seconds"] = statistics.mean(r["seconds"] for r in ok)
            line["teacher_acc"] = ok[0]["teacher_acc"]
        lines.append(line)
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    return sorted(lines, key=lambda x: (x["gap"], order[x["method"]], x["response"], x["budget"]))


def _pct(ms) -> str:
    return "–" if ms is None else f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"


def _gap(points: float | None) -> str:
    return "–" if points is None else f"{points:.1f}"


def markdown(lines: list[dict]) -> str:
    out = []
    for gap in dict.fromkeys(line["gap"] for line in lines):
        mine = [line for line in lines if line["gap"] == gap]
        teacher = next((line["teacher_acc"] for line in mine if line.get("teacher_acc") is not None), None)
        out.append(f"### gap: {gap}" + (f" (teacher {100 * teacher:.2f}%)" if teacher is not None else ""))
        out.append("")
        out.append("| method | response | budget | seeds | accuracy % (best on val) | accuracy % (last)"
                   " | dev % | synthetic - real gap (points) | fidelity % | queries (pool + setup) | MB sent"
                   " | s per cell |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for line in mine:
            name = line["label"].rsplit(" ", 1)[0]
            seeds = f"{line['seeds']}" + (f" ({line['failed']} failed)" if line["failed"] else "")
            if line["seeds"]:
                setup = f" + {line['setup']:.0f}" if line["setup"] else ""
                out.append(f"| {name} | {line['response']} | {line['budget']} | {seeds} | {_pct(line['acc'])}"
                           f" | {_pct(line['acc_last'])} | {_pct(line['dev'])} | {_gap(line['synthetic_gap'])}"
                           f" | {_pct(line['fidelity'])}"
                           f" | {line['queries']:.0f}{setup} | {line['mb_sent']:.1f} | {line['seconds']:.0f} |")
            else:
                out.append(f"| {name} | {line['response']} | {line['budget']} | {seeds} | – | – | – | – | – | – | – | – |")
        out.append("")
    return "\n".join(out)


def plot(lines: list[dict], gap: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    mine = [line for line in lines if line["gap"] == gap and line["seeds"]]
    names = list(dict.fromkeys(line["label"] for line in mine))
    colours = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, xlabel in ((axes[0], "queries", "queries"), (axes[1], "mb_sent", "MB sent")):
        for i, name in enumerate(names):
            pts = sorted((line[key], line["acc"]) for line in mine if line["label"] == name)
            hard = name.endswith(" hard")  # hard-label runs dashed, every line its own colour
            ax.errorbar([p[0] for p in pts], [100 * p[1][0] for p in pts], yerr=[100 * p[1][1] for p in pts],
                        marker="os^vD<>px*hH"[i % 12], capsize=3, label=name, color=colours(i % 20),
                        linestyle="--" if hard else "-")
        teacher = next((line["teacher_acc"] for line in mine if line.get("teacher_acc") is not None), None)
        if teacher is not None:
            ax.axhline(100 * teacher, color="black", linestyle="--", linewidth=1, label="teacher")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("student test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"gap: {gap} (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render_report(bench_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.md (and one PNG per gap) for a bench directory; returns the Markdown path."""
    bench_dir = Path(bench_dir)
    out = Path(out) if out else bench_dir
    out.mkdir(parents=True, exist_ok=True)
    lines = summarise(load_rows(bench_dir))
    text = ["# b2kd bench report", "", f"Results: `{bench_dir / 'results.csv'}`.", "", markdown(lines)]
    for gap in dict.fromkeys(line["gap"] for line in lines):
        png = out / f"accuracy-{gap}.png"
        if plot(lines, gap, png):
            text.append(f"![accuracy vs queries and MB sent, gap {gap}]({png.name})")
        else:
            text.append("(matplotlib is not installed: no plots; `pip install b2kd[plots]`)")
    path = out / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path
