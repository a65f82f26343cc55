"""The ``b2kd`` command: a thin layer that parses options, builds the config and calls the library.

Every option maps onto a config key (shown in its help), and trailing
``section.key=value`` arguments override any key.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from b2kd.config import Config, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Black-box knowledge distillation from the cloud to the edge.")
teacher_app = typer.Typer(no_args_is_help=True, help="The cloud's teacher.")
app.add_typer(teacher_app, name="teacher")
# soft_wrap: never break a message or a path across lines when output is piped
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
OutOpt = Annotated[str | None, typer.Option(help="run directory [out]")]
SeedOpt = Annotated[int | None, typer.Option(help="random seed [seed]")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda or auto [device]")]
Overrides = Annotated[list[str] | None, typer.Argument(help="overrides: section.key=value")]
TeacherOpt = Annotated[str | None, typer.Option("--teacher", help="teacher checkpoint [teacher.checkpoint]")]


def _user_errors():
    from b2kd.blackbox import BlackBoxError
    from b2kd.checkpoint import CheckpointError
    from b2kd.config import ConfigError
    from b2kd.data import DataError

    return (BlackBoxError, CheckpointError, ConfigError, DataError, ValueError, FileNotFoundError)


def friendly(fn):
    """One clear line and a non-zero exit for errors a user can cause (B2KD_DEBUG=1 shows tracebacks)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: paid responses and checkpoints are saved;"
                      " re-run the same command to resume")
            raise typer.Exit(130) from None
        except _user_errors() as exc:
            if os.environ.get("B2KD_DEBUG"):
                raise
            err.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def _config(config: Path | None, options: dict, overrides: list[str] | None) -> Config:
    return load_config(config, options, overrides)


def _print_result(result: dict) -> None:
    console.print(
        f"teacher {100 * result['teacher_acc']:.2f}% | student (best) {100 * result['student_acc']:.2f}%"
        f" | last {100 * result['latest']['acc']:.2f}% | fidelity {100 * result['fidelity']:.2f}%"
        f" | queries {result.get('queries', '-')} | private images sent"
        f" {result.get('private_images_sent', '-')}"
    )


@teacher_app.command("train")
@friendly
def teacher_train(
    config: ConfigOpt = None,
    out: OutOpt = None,
    dataset: Annotated[str | None, typer.Option(help="dataset reader [data.dataset]")] = None,
    arch: Annotated[str | None, typer.Option(help="architecture [teacher.arch]")] = None,
    epochs: Annotated[int | None, typer.Option(help="[teacher.epochs]")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    overrides: Overrides = None,
):
    """Train a teacher on the full training split and save teacher.pt with its metadata."""
    from b2kd.pipeline import run_teacher

    cfg = _config(config, {"out": out, "data.dataset": dataset, "teacher.arch": arch,
                           "teacher.epochs": epochs, "seed": seed, "device": device}, overrides)
    meta = run_teacher(cfg, cfg.out, log=console.print)
    console.print(f"teacher {meta['arch']} test accuracy {100 * meta['test_acc']:.2f}%"
                  f" -> {Path(cfg.out) / 'teacher.pt'}")


@app.command()
@friendly
def deprivatize(
    config: ConfigOpt = None,
    out: OutOpt = None,
    teacher: TeacherOpt = None,
    epochs: Annotated[int | None, typer.Option(help="[deprivatize.epochs]")] = None,
    max_queries: Annotated[int | None, typer.Option(help="[deprivatize.max_queries]")] = None,
    response: Annotated[str | None, typer.Option(help="[deprivatize.response]")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    overrides: Overrides = None,
):
    """Train the GAN on the private local images; writes generator.pt and a sample grid."""
    from b2kd.pipeline import run_deprivatize

    cfg = _config(config, {"out": out, "teacher.checkpoint": teacher, "deprivatize.epochs": epochs,
                           "deprivatize.max_queries": max_queries, "deprivatize.response": response,
                           "seed": seed, "device": device}, overrides)
    result = run_deprivatize(cfg, cfg.out, log=console.print)
    console.print(f"generator -> {result['generator']} (samples {result['samples']});"
                  f" {result['queries']} queries, private images sent {result['private_images_sent']}")


@app.command()
@friendly
def distill(
    config: ConfigOpt = None,
    out: OutOpt = None,
    teacher: TeacherOpt = None,
    generator: Annotated[str | None, typer.Option(help="generator checkpoint [deprivatize.generator]")] = None,
    method: Annotated[str | None, typer.Option(help="[distill.method]")] = None,
    response: Annotated[str | None, typer.Option(help="soft, hard, topk:K, rounded:D [distill.response]")] = None,
    budget: Annotated[int | None, typer.Option(help="query budget = pool size [distill.budget]")] = None,
    student: Annotated[str | None, typer.Option(help="[distill.student]")] = None,
    epochs: Annotated[int | None, typer.Option(help="[distill.epochs]")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    overrides: Overrides = None,
):
    """Pay for a pool of synthetic queries, train the student on it, and report on the test set."""
    from b2kd.pipeline import run_distill, run_evaluate

    cfg = _config(config, {"out": out, "teacher.checkpoint": teacher, "deprivatize.generator": generator,
                           "distill.method": method, "distill.response": response,
                           "distill.budget": budget, "distill.student": student,
                           "distill.epochs": epochs, "seed": seed, "device": device}, overrides)
    summary = run_distill(cfg, cfg.out, log=console.print)
    if summary.get("train_img_per_s"):
        console.print(f"training throughput: {summary['train_img_per_s']:.1f} images/s")
    _print_result(run_evaluate(cfg.out, cfg))


@app.command("evaluate")
@friendly
def evaluate_cmd(run_dir: Annotated[Path, typer.Argument(help="a distillation run directory")]):
    """Evaluate a run's students on the test set; writes report.md and report.json."""
    from b2kd.pipeline import run_evaluate

    _print_result(run_evaluate(run_dir))
    console.print(f"report -> {run_dir / 'report.md'}")


@app.command()
@friendly
def demo(
    config: ConfigOpt = Path("configs/demo.yaml"),
    out: Annotated[str, typer.Option(help="run directory")] = "runs/demo",
    overrides: Overrides = None,
):
    """The whole story on MNIST, offline: teacher, deprivatize, MEKD soft and hard, report."""
    from b2kd.demo import run_demo

    cfg = _config(config, {"out": out}, overrides)
    run_demo(cfg, Path(cfg.out), console)


def main() -> None:
    app(prog_name="b2kd")


if __name__ == "__main__":
    sys.exit(main())
