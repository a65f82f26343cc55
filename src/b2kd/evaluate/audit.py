"""``b2kd audit``: what left the device, measured against the private images it must protect.

The ledger keeps every image that was sent. Each is compared with the edge's
private set: L2 distance in pixel space (values in [0, 1]) to its nearest
private image, and the best SSIM among its few nearest private images. On
their own those numbers mean little (two different handwritten 1s are close),
so the same statistics are measured for *held-out real images* of the same
distribution (training images outside the private split): an image that is
closer to a private image than any held-out real image comes (by the chosen
quantile) is a near-copy. A method that sends local images (Knockoff) sends
exact copies; MEKD, which sends only generator images, should send none.

The threshold is an empirical extreme, so it has a known false-alarm rate: a
new real image that copies nothing is flagged with probability about
2 / (n + 1) for n held-out images (L2 or SSIM beyond all of them), 0.2% at the
default n = 1000. A generator that drew perfectly new digits would show that
rate; one that memorised private images would show far more.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from b2kd.core.config import Config, ConfigError
from b2kd.core.grid import save_grid
from b2kd.core.run_dir import load_run_config
from b2kd.data import edge_split, load_dataset, private_images
from b2kd.edge import Ledger, image_hashes
from b2kd.evaluate.ssim import ssim

CANDIDATES = 8  # SSIM is computed against this many nearest private images by L2
GRID_PAIRS = 16
GRID = "images/audit_closest.png"  # in the run directory


def nearest(
    queries: torch.Tensor, refs: torch.Tensor, k: int = CANDIDATES, chunk: int = 512
) -> dict:
    """For each uint8 query image: L2 to its nearest ref, that ref's index, and the best SSIM
    among its ``k`` nearest refs by L2 (SSIM against every ref would cost N x M SSIM maps)."""
    k = min(k, len(refs))
    r = refs.flatten(1).float() / 255
    r_sq = (r * r).sum(1)
    l2, idx, best_ssim = [], [], []
    for q_u8 in queries.split(chunk):
        q = q_u8.flatten(1).float() / 255
        d2 = (q * q).sum(1, keepdim=True) + r_sq - 2 * q @ r.T
        top = d2.topk(k, dim=1, largest=False).indices
        exact = (q[:, None] - r[top]).square().sum(-1).sqrt()  # the matmul form loses digits near 0
        dist, arg = exact.min(1)
        pairs = ssim(q_u8.repeat_interleave(k, 0), refs[top.flatten()]).view(-1, k)
        l2.append(dist)
        idx.append(top.gather(1, arg[:, None]).squeeze(1))
        best_ssim.append(pairs.max(1).values)
    return {"l2": torch.cat(l2), "idx": torch.cat(idx), "ssim": torch.cat(best_ssim)}


def _summary(values: torch.Tensor) -> dict:
    v = values.numpy().astype(np.float64)
    return {"min": float(v.min()), "p1": float(np.percentile(v, 1)), "median": float(np.median(v)),
            "p99": float(np.percentile(v, 99)), "max": float(v.max())}  # fmt: skip


def private_and_holdout(
    cfg: Config, n_holdout: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The private set, and a seeded sample of real training images outside it (same distribution)."""
    d = cfg.data
    train = load_dataset(d.dataset, "train", d.root, d.image_size, d.channels)
    split = edge_split(len(train), d.local_fraction, d.split_seed)
    outside = torch.ones(len(train), dtype=torch.bool)
    outside[split.local_idx] = False
    rest = outside.nonzero().squeeze(1)
    if len(rest) == 0:
        raise ConfigError("no training images outside the private split to calibrate the audit on")
    pick = rest[
        torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:n_holdout]
    ]
    return private_images(train, split), train.images[pick]


def audit(
    sent: torch.Tensor, private: torch.Tensor, holdout: torch.Tensor, quantile: float = 0.0
) -> tuple[dict, dict]:
    """Near-copy statistics of ``sent`` against ``private``, thresholds set by ``holdout``;
    returns (summary, per-sent-image :func:`nearest` results).

    Near-copy: L2 below the ``quantile`` of the held-out images' nearest-private
    L2, or SSIM above their ``1 - quantile`` best SSIM. At quantile 0 that is
    "closer to a private image than every held-out real image is".
    """
    if not 0 <= quantile < 0.5:
        raise ConfigError(f"quantile must be in [0, 0.5), got {quantile}")
    if sent.shape[1:] != private.shape[1:]:
        raise ConfigError(
            f"sent images are {tuple(sent.shape[1:])} but the private images are"
            f" {tuple(private.shape[1:])}"
        )
    ref = nearest(holdout, private)
    l2_max = float(np.quantile(ref["l2"].numpy(), quantile))
    ssim_min = float(np.quantile(ref["ssim"].numpy(), 1 - quantile))
    got = nearest(sent, private)
    near = (got["l2"] < l2_max) | (got["ssim"] > ssim_min)
    private_hashes = set(image_hashes(private))
    summary = {
        "sent_images": len(sent),
        "private_images": len(private),
        "holdout_images": len(holdout),
        "exact_private_copies": sum(h in private_hashes for h in image_hashes(sent)),
        "threshold": {"quantile": quantile, "l2": l2_max, "ssim": ssim_min},
        "near_copies": int(near.sum()),
        "near_copy_fraction": float(near.float().mean()),
        "sent": {"l2": _summary(got["l2"]), "ssim": _summary(got["ssim"])},
        "holdout": {"l2": _summary(ref["l2"]), "ssim": _summary(ref["ssim"])},
    }
    return summary, got


def verdict(r: dict) -> str:
    """One line: pass or fail, and the threshold that decided it."""
    t = r["threshold"]
    rule = (
        f"near-copy = L2 < {t['l2']:.3f} or SSIM > {t['ssim']:.3f}, the closest that"
        f" {r['holdout_images']} held-out real images come (quantile {t['quantile']:g})"
    )
    if r["near_copies"] == 0:
        return (
            f"PASS: none of the {r['sent_images']} images sent is a near-copy of the"
            f" {r['private_images']} private images ({rule})"
        )
    return (
        f"FAIL: {r['near_copies']} of the {r['sent_images']} images sent"
        f" ({100 * r['near_copy_fraction']:.2f}%) are near-copies of private images,"
        f" {r['exact_private_copies']} of them exact ({rule})"
    )


def audit_run(
    run_dir: str | Path, *, holdout: int = 1000, quantile: float = 0.0, seed: int = 0
) -> dict:
    """Audit a run directory's ledger; writes audit.md, audit.json and images/audit_closest.png."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ledger_path = run_dir / "ledger.sqlite"
    if not ledger_path.is_file():
        raise ConfigError(f"{run_dir} has no ledger.sqlite: it never queried the teacher")
    if holdout < 1:
        raise ConfigError(f"the audit needs at least one held-out image, got {holdout}")
    with Ledger(ledger_path) as ledger:
        totals = ledger.totals()
        _, sent = ledger.images()
    if sent is None:
        why = "kept no images (keep_images=False)" if totals["queries"] else "records no query"
        raise ConfigError(f"nothing to audit: the ledger of {run_dir} {why}")
    private, held = private_and_holdout(cfg, holdout, seed)
    summary, got = audit(sent, private, held, quantile)
    order = got["l2"].argsort()[:GRID_PAIRS]
    pairs = torch.stack([sent[order], private[got["idx"][order]]], 1).flatten(0, 1)
    grid = save_grid(pairs, run_dir / GRID, nrow=8)
    result = {
        "run": str(run_dir),
        **totals,
        **summary,
        "verdict": verdict(summary),
        "grid": str(grid),
    }
    write_audit_report(run_dir, result)
    return result


def write_audit_report(run_dir: Path, r: dict) -> None:
    (run_dir / "audit.json").write_text(json.dumps(r, indent=2))
    lines = [
        "# b2kd audit: what left the device",
        "",
        (
            f"- images sent: {r['queries']}, {r['bytes_sent'] / 1e6:.2f} MB"
            f" (received {r['bytes_received'] / 1e6:.2f} MB)"
        ),
        (
            f"- private images: {r['private_images']}; held-out real images for the threshold:"
            f" {r['holdout_images']}"
        ),
        f"- exact copies of private images (by bytes): {r['exact_private_copies']}",
        f"- near-copies: {r['near_copies']} ({100 * r['near_copy_fraction']:.2f}%)",
        "",
        "| nearest private image | min | 1% | median | 99% | max |",
        "|---|---|---|---|---|---|",
    ]
    for who, label in (("sent", "sent images"), ("holdout", "held-out real images")):
        for stat in ("l2", "ssim"):
            s = r[who][stat]
            lines.append(
                f"| {label}, {stat.upper()} | {s['min']:.3f} | {s['p1']:.3f}"
                f" | {s['median']:.3f} | {s['p99']:.3f} | {s['max']:.3f} |"
            )
    lines += [
        "",
        f"Closest sent/private pairs (each sent image left of its nearest private image): ![]({GRID})",
        "",
        f"**{r['verdict']}**",
    ]
    (run_dir / "audit.md").write_text("\n".join(lines) + "\n")
