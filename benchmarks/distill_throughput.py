"""MEKD training throughput: b2kd's step against the reference-equivalent step, and `b2kd distill`.

1. In one process, interleaved, several warm repetitions each: b2kd's step
   (paid pool, cached G(t / tau_g), frozen G, one generator forward+backward)
   and the reference-equivalent step (fresh G(z) batch, teacher forward,
   G on the teacher's output and on the student's output, gradients kept on
   G's parameters); see ``b2kd.distill.reference_step``.
2. The real ``b2kd distill`` pipeline for a few steps on the preset.

Weights are random (throughput does not depend on them). Example:

    .venv/bin/python benchmarks/distill_throughput.py --json benchmarks/results/paper-mnist-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from b2kd.blackbox import ResponseKind
from b2kd.core.checkpoint import save_classifier, save_generator
from b2kd.core.config import load_config
from b2kd.core.engine import make_optimizer
from b2kd.core.runtime import hardware
from b2kd.distill.methods.mekd import MEKD
from b2kd.distill.reference_step import reference_step
from b2kd.distill.step import train_step
from b2kd.models import Generator, build_model
from b2kd.pipeline import run_distill
from b2kd.pool.paid import synthesise


def compare_steps(cfg, steps: int, reps: int, device: torch.device, bf16: bool = False,
                  compile_: bool = False) -> dict:
    """Median images/s of both steps; ``bf16`` runs them under autocast, ``compile_`` under torch.compile."""
    d, dist = cfg.data, cfg.distill
    kind = ResponseKind.parse(dist.response)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher.arch, 10, d.channels, d.image_size).to(device).eval()
    generator = Generator(10, d.image_size, d.channels, tuple(cfg.deprivatize.widths)).to(device).eval()
    student_fast = build_model(dist.student, 10, d.channels, d.image_size).to(device)
    student_ref = copy.deepcopy(student_fast)
    generator_ref = copy.deepcopy(generator)
    batch = dist.batch_size

    images = synthesise(generator, steps * batch, seed=0).to(device)
    with torch.no_grad():
        responses = torch.cat([kind.apply(torch.softmax(teacher(images[i : i + 256]), 1))
                               for i in range(0, len(images), 256)])
    method = MEKD(dist, kind, generator)
    method.prepare(responses, device)
    opt_fast = make_optimizer(student_fast, dist.lr, dist.momentum, dist.weight_decay)
    opt_ref = make_optimizer(student_ref, dist.lr, dist.momentum, dist.weight_decay)
    if compile_:
        student_fast, student_ref = torch.compile(student_fast), torch.compile(student_ref)
        method.generator, generator_ref = torch.compile(method.generator), torch.compile(generator_ref)
        teacher = torch.compile(teacher)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fast_rep() -> float:
        sync()
        start = time.perf_counter()
        for s in range(steps):
            idx = torch.arange(s * batch, (s + 1) * batch, device=device)
            with autocast:
                train_step(method, student_fast, opt_fast, images[idx], idx)
        sync()
        return steps * batch / (time.perf_counter() - start)

    def ref_rep() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            with autocast:
                reference_step(student_ref, generator_ref, teacher, opt_ref, batch, kind)
        sync()
        return steps * batch / (time.perf_counter() - start)

    student_fast.train()
    student_ref.train()
    fast_rep(), ref_rep()  # warm-up (and compilation), discarded
    fast_rep(), ref_rep()
    fast, ref = [], []
    for _ in range(reps):
        fast.append(fast_rep())
        ref.append(ref_rep())
    b2kd, reference = statistics.median(fast), statistics.median(ref)
    return {"b2kd_img_s": b2kd, "reference_img_s": reference, "ratio": b2kd / reference,
            "b2kd_img_s_all": fast, "reference_img_s_all": ref}


def pipeline_throughput(config: str, steps: int, device: str) -> float:
    """images/s that ``b2kd distill`` itself reports on the preset, for ``steps`` steps."""
    base = load_config(config)
    d = base.data
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        teacher = build_model(base.teacher.arch, 10, d.channels, d.image_size)
        save_classifier(teacher, tmp / "teacher.pt", dataset=d.dataset, image_size=d.image_size)
        save_generator(Generator(10, d.image_size, d.channels, tuple(base.deprivatize.widths)),
                       tmp / "generator.pt")
        cfg = load_config(config, overrides=[
            f"teacher.checkpoint={tmp / 'teacher.pt'}", f"deprivatize.generator={tmp / 'generator.pt'}",
            f"distill.budget={steps * base.distill.batch_size}", "distill.val_fraction=0",
            f"distill.max_steps={steps}", f"device={device}", f"out={tmp / 'run'}",
        ])
        return run_distill(cfg, cfg.out, log=lambda *_: None)["train_img_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/paper-mnist.yaml")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each step")
    parser.add_argument("--pipeline-steps", type=int, default=20, help="0 skips the pipeline run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config, overrides=[f"device={args.device}"])
    device = torch.device("cuda" if args.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    result = {
        "config": args.config,
        "teacher": cfg.teacher.arch,
        "student": cfg.distill.student,
        "image_size": cfg.data.image_size,
        "generator_widths": list(cfg.deprivatize.widths),
        "batch_size": cfg.distill.batch_size,
        "steps_per_rep": args.steps,
        "reps": args.reps,
        **compare_steps(cfg, args.steps, args.reps, device),
    }
    print(f"plain: b2kd {result['b2kd_img_s']:.1f} img/s, reference {result['reference_img_s']:.1f} img/s",
          flush=True)
    if device.type == "cuda":  # the same comparison under bf16 autocast and torch.compile
        result["variants"] = {}
        for name, bf16, compile_ in (("bf16", True, False), ("compile", False, True),
                                     ("bf16+compile", True, True)):
            try:
                result["variants"][name] = compare_steps(cfg, args.steps, args.reps, device, bf16, compile_)
            except Exception as error:  # noqa: BLE001 - a variant that cannot run here is reported, not fatal
                result["variants"][name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{name}: {result['variants'][name]}", flush=True)  # before any later variant can hang
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if args.pipeline_steps:
        result["pipeline_img_s"] = pipeline_throughput(args.config, args.pipeline_steps, str(device))
    result.update(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  hardware=hardware(), torch=torch.__version__)
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key}: {value:.2f}")
        elif isinstance(value, list) and value and isinstance(value[0], float):
            print(f"{key}: {', '.join(f'{v:.1f}' for v in value)}")
        elif key == "variants":
            for name, v in value.items():
                print(f"{name}: " + ", ".join(f"{k} {x:.2f}" if isinstance(x, float) else f"{k} {x}"
                                              for k, x in v.items() if not k.endswith("_all")))
        else:
            print(f"{key}: {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
