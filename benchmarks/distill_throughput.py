"""MEKD training throughput of `b2kd distill` on a preset (default: configs/paper-mnist.yaml).

Runs the real distillation pipeline for a few steps with randomly initialised
teacher and generator of the preset's shapes (throughput does not depend on
the weights), and prints images/s. Example:

    .venv/bin/python benchmarks/distill_throughput.py --steps 20 --json runs/bench/throughput.json
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from b2kd.checkpoint import save_classifier, save_generator
from b2kd.config import load_config
from b2kd.models import Generator, build_model
from b2kd.pipeline import run_distill
from b2kd.runtime import hardware


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/paper-mnist.yaml")
    parser.add_argument("--steps", type=int, default=20, help="training steps to time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = load_config(args.config)
        d = base.data
        torch.manual_seed(0)
        teacher = build_model(base.teacher.arch, 10, d.channels, d.image_size)
        save_classifier(teacher, tmp / "teacher.pt", dataset=d.dataset, image_size=d.image_size)
        generator = Generator(10, d.image_size, d.channels, tuple(base.deprivatize.widths))
        save_generator(generator, tmp / "generator.pt")
        pool = args.steps * base.distill.batch_size
        cfg = load_config(args.config, overrides=[
            f"teacher.checkpoint={tmp / 'teacher.pt'}", f"deprivatize.generator={tmp / 'generator.pt'}",
            f"distill.budget={pool}", "distill.val_fraction=0", f"distill.max_steps={args.steps}",
            f"device={args.device}", f"out={tmp / 'run'}",
        ])
        start = time.perf_counter()
        summary = run_distill(cfg, cfg.out, log=lambda *_: None)
        wall = time.perf_counter() - start

    result = {
        "config": args.config,
        "teacher": base.teacher.arch,
        "student": base.distill.student,
        "image_size": d.image_size,
        "generator_widths": list(base.deprivatize.widths),
        "batch_size": base.distill.batch_size,
        "steps": args.steps,
        "b2kd_img_s": summary["train_img_per_s"],
        "wall_s_including_pool": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "hardware": hardware(),
        "torch": torch.__version__,
    }
    for key, value in result.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
