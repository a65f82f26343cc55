"""How the teacher labelled the paid pool, class by class, and a warning when a class is thin.

A student learns a class only from the paid images the teacher put in it. When
the generator's images fall mostly into a few classes, the others are thin: the
student may never predict them, while its agreement with the teacher on the
pool's held-out slice (val-agree) still reads high, because that figure is
measured on the same kind of images and is not test accuracy.

A class is *thin* when it holds fewer than ``factor * N / K`` of the N paid
answers (K classes, ``factor`` = ``distill.thin_class_factor``, 1/4 by default):
under a quarter of its share of a uniform pool.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from b2kd.blackbox import ResponseKind, top1

PLOT_NAME = "pool-labels.png"
NOT_TEST_ACCURACY = (
    "Agreement with the teacher on the pool's held-out slice (val-agree, which chose the"
    " `best` student) is measured on paid images like the ones the student trained on"
    " (synthetic ones for generator methods): it is not test accuracy."
)


def summarise(responses: torch.Tensor, thin_factor: float = 0.25) -> dict:
    """Count and share per class of the teacher's top-1 over ``responses`` (N, K), API form.

    Returns {"answers": N, "num_classes": K, "counts", "shares", "thin_factor",
    "thin_below": factor * N / K, "thin_classes": classes with fewer answers than that}.
    """
    n, k = responses.shape
    counts = torch.bincount(top1(responses), minlength=k).tolist() if n else [0] * k
    thin_below = thin_factor * n / k
    return {
        "answers": n,
        "num_classes": k,
        "counts": counts,
        "shares": [c / n if n else 0.0 for c in counts],
        "thin_factor": thin_factor,
        "thin_below": thin_below,
        "thin_classes": [c for c in range(k) if counts[c] < thin_below],
    }


def thin_warning(summary: dict | None) -> str | None:
    """One line naming the thin classes, or None when there are none (or no summary)."""
    if not summary or not summary["thin_classes"]:
        return None
    listed = ", ".join(f"{c} ({summary['counts'][c]})" for c in summary["thin_classes"])
    what = "class" if len(summary["thin_classes"]) == 1 else "classes"
    return (
        f"thin {what} in the paid pool: {listed} of {summary['answers']} answers, under"
        f" {summary['thin_below']:g} each ({summary['thin_factor']:g} x a uniform share); the"
        " student may rarely predict them, and val-agree on the pool will not show it"
    )


def paid_answers(ledger_path: str | Path, kind: str, stage: str = "distill") -> torch.Tensor | None:
    """Every answer of response kind ``kind`` that ``stage`` paid for in the ledger, (N, K).

    Read-only and filtered by stage: a run's ledger may also hold rows of other
    stages (a copied setup ledger, test images paid to measure fidelity), which
    are no part of the pool; ``Ledger`` looks rows up by image hash only. None
    when there are no such rows or they disagree on K.
    """
    path = Path(ledger_path)
    if not path.is_file():
        return None
    kind = str(ResponseKind.parse(kind))
    with closing(sqlite3.connect(path, timeout=30)) as db:  # read only: no write is issued
        blobs = [b for (b,) in db.execute(
            "SELECT response FROM queries WHERE kind = ? AND stage = ?", (kind, stage))]
    if not blobs or len({len(b) for b in blobs}) != 1:
        return None
    values = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)
    return torch.from_numpy(values.copy())


def plot(summary: dict, path: str | Path) -> bool:
    """Bar plot of the counts, thin classes in red, the uniform share and the thin line dashed.

    False (nothing written) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    k, counts = summary["num_classes"], summary["counts"]
    thin = set(summary["thin_classes"])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * k + 1.5), 3.2))
    ax.bar(range(k), counts, color=["tab:red" if c in thin else "tab:blue" for c in range(k)])
    ax.axhline(summary["answers"] / k, color="black", linestyle="--", linewidth=1,
               label="uniform share")
    ax.axhline(summary["thin_below"], color="tab:red", linestyle=":", linewidth=1,
               label="thin below")
    ax.set_xticks(range(k))
    ax.set_xlabel("teacher's top-1 class")
    ax.set_ylabel("paid images")
    ax.set_title(f"how the teacher labelled the paid pool ({summary['answers']} answers)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _source(summary: dict) -> str:
    extra = summary.get("extra_answers", 0)
    own = "paid for by this run, `ledger.sqlite`"
    return own if not extra else f"{summary['answers'] - extra} {own}; {extra} reused from deprivatization"


def markdown(summary: dict | None) -> list[str]:
    """The report.md section: table, warning, plot (or why there is none), val-agree note."""
    lines = ["", "## How the teacher labelled the paid pool", ""]
    if not summary:
        return [*lines, "No paid answers of this run's response kind in its ledger.", "",
                NOT_TEST_ACCURACY]
    lines += [
        (f"The teacher's top-1 over the {summary['answers']} answers in the pool"
         f" ({_source(summary)}). A class is thin below {summary['thin_below']:g} answers"
         f" ({summary['thin_factor']:g} of a uniform share, `distill.thin_class_factor`)."),
        "",
        "| class | answers | share | |",
        "|---|---|---|---|",
    ]
    thin = set(summary["thin_classes"])
    for c, (count, share) in enumerate(zip(summary["counts"], summary["shares"], strict=True)):
        lines.append(f"| {c} | {count} | {100 * share:.2f}% | {'thin' if c in thin else ''} |")
    warning = thin_warning(summary)
    if warning:
        lines += ["", f"**Warning:** {warning}."]
    lines.append("")
    if summary.get("plot"):
        lines.append(f"![teacher's top-1 over the paid pool]({summary['plot']})")
    else:
        lines.append("(matplotlib is not installed: no bar plot; `pip install b2kd[plots]`)")
    return [*lines, "", NOT_TEST_ACCURACY]


def run_summary(run_dir: str | Path, kind: str, thin_factor: float,
                extra: torch.Tensor | None = None) -> dict | None:
    """The summary of a run directory's paid pool (None without paid answers); draws the plot.

    ``extra``: answers in the pool that the run did not pay for itself (deprivatization's,
    with ``distill.reuse_setup``), in the same API form; counted with the run's own.
    """
    run_dir = Path(run_dir)
    responses = paid_answers(run_dir / "ledger.sqlite", kind)
    if extra is not None and len(extra):
        responses = extra.float() if responses is None else torch.cat([responses, extra.float()])
    if responses is None:
        return None
    summary = summarise(responses, thin_factor)
    summary["extra_answers"] = 0 if extra is None else len(extra)
    summary["plot"] = PLOT_NAME if plot(summary, run_dir / PLOT_NAME) else None
    return summary
