"""report.md and report.json of a run."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _refused(result: dict) -> str:
    """Beside what was paid: the answers that arrived and were refused (a provider bills them too)."""
    refused = result.get("refused_answers") or 0
    if not refused:
        return ""
    return (f"; received and refused {refused} answers ({result.get('refused_bytes', 0) / 1e6:.2f} MB,"
            " not in the pool: invalid, malformed or too large)")


def write_report(run_dir: str | Path, result: dict) -> None:
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# b2kd report: {result.get('method', '?')} / {result.get('response', '?')}",
        "",
        f"- teacher test accuracy: {_pct(result.get('teacher_acc'))}",
        (
            f"- queries: {result.get('queries', '-')} (budget {result.get('budget', '-')}),"
            f" sent {result.get('bytes_sent', 0) / 1e6:.2f} MB,"
            f" received {result.get('bytes_received', 0) / 1e6:.2f} MB{_refused(result)}"
        ),
        f"- private images sent: {result.get('private_images_sent', '-')}",
        f"- hardware: {result.get('hardware', '-')}",
        "",
        "| student | epoch | test acc | fidelity |",
        "|---|---|---|---|",
    ]
    for name in ("latest", "best"):
        if name in result:
            r = result[name]
            label = "last epoch" if name == "latest" else "best on validation (paid pool)"
            epoch = "-" if r.get("epoch") is None else r["epoch"] + 1  # 1-based for people
            lines.append(f"| {label} | {epoch} | {_pct(r['acc'])} | {_pct(r.get('fidelity'))} |")
    best = result.get("best")
    if best:
        lines += ["", "Per-class test accuracy (best): " + ", ".join(
            f"{k}: {_pct(a)}" for k, a in enumerate(best["per_class_acc"]))]
    if result.get("synthetic_vs_real"):  # b2kd.evaluate.synthetic_gap
        from b2kd.evaluate.synthetic_gap import markdown as gap_markdown

        lines += gap_markdown(result["synthetic_vs_real"])
    if "pool_labels" in result:  # how the teacher labelled the paid pool (b2kd.pool.labels)
        from b2kd.pool.labels import markdown

        lines += markdown(result["pool_labels"])
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
