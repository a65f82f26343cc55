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
from rich.markup import escape
from typer.core import TyperGroup

from b2kd.core.config import Config, load_config
from b2kd.core.run_dir import check_yaml

try:  # typer 0.24 and later carry their own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_errors

#: `b2kd` (or `b2kd teacher`) alone: click shows the help through this error (click 8.2 and later).
_NO_ARGS = getattr(click_errors, "NoArgsIsHelpError", ())

# soft_wrap: never break a message or a path across lines when output is piped
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _error_line(message: str, code: int) -> None:
    """The one form every b2kd error takes: 'error: ...' on stderr, then exit ``code``."""
    err.print(f"[red]error:[/] {escape(message)}", markup=True, highlight=False)
    sys.exit(code)


class OneLineErrors(TyperGroup):
    """The app's entry point: click's usage errors (an unknown option, a value of the wrong type)
    end as one 'error: ...' line like every other b2kd error, not a usage block ending 'Error: ...'."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except _NO_ARGS as exc:  # `b2kd` alone: the help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click_errors.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _error_line(exc.format_message() + hint, exc.exit_code)
        except typer.Abort:
            _error_line("aborted", 1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # help texts name config keys in [brackets]
                  help="Black-box knowledge distillation from the cloud to the edge.")
teacher_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The cloud's teacher.")
app.add_typer(teacher_app, name="teacher")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
OutOpt = Annotated[str | None, typer.Option(help="run directory [out]")]
SeedOpt = Annotated[int | None, typer.Option(help="random seed [seed]")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda or auto [device]")]
Overrides = Annotated[list[str] | None, typer.Argument(help="overrides: section.key=value")]
TeacherOpt = Annotated[str | None, typer.Option("--teacher", help="teacher checkpoint [teacher.checkpoint]")]
TeacherUrlOpt = Annotated[str | None, typer.Option(
    "--teacher-url", help="a served teacher (KServe v2), in place of --teacher [teacher.url]")]
ApiKeyOpt = Annotated[str | None, typer.Option(
    "--api-key", envvar="B2KD_API_KEY", help="API key of --teacher-url [teacher.api_key]")]


def _user_errors():
    from b2kd.blackbox import BlackBoxError
    from b2kd.core.checkpoint import CheckpointError
    from b2kd.core.config import ConfigError
    from b2kd.data import DataError
    from b2kd.deploy.predict import ModelError

    return (BlackBoxError, CheckpointError, ConfigError, DataError, ModelError, ValueError,
            FileNotFoundError)


def friendly(fn):
    """One clear line and a non-zero exit for errors a user can cause (B2KD_DEBUG=1 shows tracebacks)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            from b2kd.core import distributed

            distributed.finish()  # under torchrun: the ranks leave together
            return result
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: paid responses and checkpoints are saved;"
                      " re-run the same command to resume")
            raise typer.Exit(130) from None
        except _user_errors() as exc:
            if os.environ.get("B2KD_DEBUG"):
                raise
            err.print(f"[red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
            raise typer.Exit(2) from None
        except Exception as exc:  # under torchrun: another rank failed or stopped answering
            from b2kd.core.distributed import peer_failure

            message = peer_failure(exc)
            if message is None or os.environ.get("B2KD_DEBUG"):
                raise
            err.print(f"[red]error:[/] {escape(message)}", markup=True, highlight=False)
            raise typer.Exit(3) from None

    return wrapper


def _other_rank() -> bool:
    """Under torchrun, every rank but 0 ends quietly: rank 0 reports for the job."""
    from b2kd.core import distributed

    return not distributed.is_main()


def _config(config: Path | None, options: dict, overrides: list[str] | None) -> Config:
    if config is not None and config.is_file():
        check_yaml(config)
    return load_config(config, options, overrides)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _print_result(result: dict) -> None:
    paid = result.get("fidelity_images")  # --pay-fidelity: teacher and fidelity on a paid sample
    sample = f" (on a paid sample of {paid} test images)" if paid else ""
    console.print(
        f"teacher {_pct(result['teacher_acc'])}{sample} | student (best) {_pct(result['student_acc'])}"
        f" | last {_pct(result['latest']['acc'])} | fidelity {_pct(result['fidelity'])}"
        f"{' (same sample)' if paid else ''}"
        f" | queries {result.get('queries', '-')} | private images sent"
        f" {result.get('private_images_sent', '-')}"
    )
    from b2kd.pool.labels import thin_warning

    warning = thin_warning(result.get("pool_labels"))
    if warning:  # the end of `b2kd distill` and `b2kd evaluate`
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)


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
    if _other_rank():
        return
    console.print(f"teacher {meta['arch']} test accuracy {100 * meta['test_acc']:.2f}%"
                  f" -> {Path(cfg.out) / 'teacher.pt'}")


@app.command()
@friendly
def deprivatize(
    config: ConfigOpt = None,
    out: OutOpt = None,
    teacher: TeacherOpt = None,
    teacher_url: TeacherUrlOpt = None,
    api_key: ApiKeyOpt = None,
    epochs: Annotated[int | None, typer.Option(help="[deprivatize.epochs]")] = None,
    max_queries: Annotated[int | None, typer.Option(help="[deprivatize.max_queries]")] = None,
    response: Annotated[str | None, typer.Option(help="[deprivatize.response]")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    overrides: Overrides = None,
):
    """Train the GAN on the private local images; writes generator.pt and a sample grid."""
    from b2kd.pipeline import run_deprivatize

    cfg = _config(config, {"out": out, "teacher.checkpoint": teacher, "teacher.url": teacher_url,
                           "teacher.api_key": api_key, "deprivatize.epochs": epochs,
                           "deprivatize.max_queries": max_queries, "deprivatize.response": response,
                           "seed": seed, "device": device}, overrides)
    result = run_deprivatize(cfg, cfg.out, log=console.print)
    if _other_rank():
        return
    console.print(f"generator -> {result['generator']} (samples {result['samples']});"
                  f" {result['queries']} queries, private images sent {result['private_images_sent']}")


@app.command()
@friendly
def distill(
    config: ConfigOpt = None,
    out: OutOpt = None,
    teacher: TeacherOpt = None,
    teacher_url: TeacherUrlOpt = None,
    api_key: ApiKeyOpt = None,
    generator: Annotated[str | None, typer.Option(help="generator checkpoint [deprivatize.generator]")] = None,
    method: Annotated[str | None, typer.Option(help="[distill.method]")] = None,
    response: Annotated[str | None, typer.Option(
        help="soft, hard, topk:K, rounded:D; KIND+embedding for gray-box answers [distill.response]")] = None,
    budget: Annotated[int | None, typer.Option(help="query budget = pool size [distill.budget]")] = None,
    student: Annotated[str | None, typer.Option(help="[distill.student]")] = None,
    epochs: Annotated[int | None, typer.Option(help="[distill.epochs]")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    overrides: Overrides = None,
):
    """Pay for a pool of synthetic queries, train the student on it, and report on the test set."""
    from b2kd.pipeline import run_distill, run_evaluate

    cfg = _config(config, {"out": out, "teacher.checkpoint": teacher, "teacher.url": teacher_url,
                           "teacher.api_key": api_key, "deprivatize.generator": generator,
                           "distill.method": method, "distill.response": response,
                           "distill.budget": budget, "distill.student": student,
                           "distill.epochs": epochs, "seed": seed, "device": device}, overrides)
    summary = run_distill(cfg, cfg.out, log=console.print)
    if _other_rank():
        return
    if summary.get("train_img_per_s"):
        console.print(f"training throughput: {summary['train_img_per_s']:.1f} images/s")
    _print_result(run_evaluate(cfg.out, cfg))


@app.command("evaluate")
@friendly
def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a distillation run directory")],
    pay_fidelity: Annotated[int | None, typer.Option(
        help="with a served teacher and no local copy: pay for N test images (through the ledger,"
             " apart from the pool) to report teacher accuracy and fidelity")] = None,
    api_key: ApiKeyOpt = None,
):
    """Evaluate a run's students on the test set; writes report.md and report.json."""
    from b2kd.pipeline import run_evaluate

    if pay_fidelity is None:
        _print_result(run_evaluate(run_dir))
    else:
        from b2kd.evaluate.fidelity import evaluate_with_paid_fidelity

        _print_result(evaluate_with_paid_fidelity(run_dir, pay_fidelity, api_key, log=console.print))
    console.print(f"report -> {run_dir / 'report.md'}")


ledger_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="A run's query ledger.")
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("clean")
@friendly
def ledger_clean(run: Annotated[Path, typer.Argument(help="a run directory, or a ledger .sqlite file")]):
    """Remove the answers a ledger holds that are no valid response (NaN, inf, logits taken for
    probabilities, ...): a ledger refuses to serve them until then. They are paid for again."""
    from b2kd.edge.ledger import clean_ledger

    path, removed, kept = clean_ledger(run)
    console.print(f"{path}: removed {removed} invalid answers, kept {kept}", markup=False, highlight=False)


RunDir = Annotated[Path, typer.Argument(help="a distillation run directory")]


@app.command("export")
@friendly
def export_cmd(
    run_dir: RunDir,
    input_kind: Annotated[str, typer.Option("--input", help="what the device feeds: uint8, or float in [0, 1]")] = "uint8",
    calibration: Annotated[int, typer.Option(help="generator images to calibrate INT8 on")] = 512,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="also write a dynamically quantized model")] = False,
    threads: Annotated[int, typer.Option(help="onnxruntime threads for the latency figures")] = 1,
    generator: Annotated[str | None, typer.Option(help="calibrate on fresh samples of this generator")] = None,
):
    """Export the best student to ONNX fp32 and INT8; measure parity, size, latency and accuracy."""
    from b2kd.deploy.export import export_run

    result = export_run(run_dir, input_kind=input_kind, calibration=calibration, dynamic=dynamic,
                        threads=threads, generator=generator, log=console.print)
    for name, m in result["models"].items():
        console.print(f"{name}: {run_dir / m['file']} {m['bytes'] / 1024:.1f} KB | test acc"
                      f" {100 * m['acc']:.2f}% | p50 {m['latency_ms_p50']:.3f} ms, p95"
                      f" {m['latency_ms_p95']:.3f} ms at batch 1 | {m['batch64_img_per_s']:.0f} images/s"
                      " at batch 64", highlight=False)
    console.print(f"report -> {run_dir / 'export.md'}")


@app.command("adapt")
@friendly
def adapt_cmd(
    run_dir: RunDir,
    labelled: Annotated[str | None, typer.Option(
        help="the new task's labelled images: a folder of class folders (PNG), or an .npz with"
             " images, labels and optionally classes [adapt.labelled]")] = None,
    shots: Annotated[int | None, typer.Option(help="labelled images per class, a seeded choice [adapt.shots]")] = None,
    test: Annotated[str | None, typer.Option(help="a labelled test set of the new task, same formats [adapt.test]")] = None,
    classes: Annotated[str | None, typer.Option(
        help="the new task's class names in order, comma-separated; every class found must be one"
             " [adapt.classes]")] = None,
    out: Annotated[str | None, typer.Option(help="output directory [RUN/adapt]")] = None,
    seed: Annotated[int | None, typer.Option(help="[adapt.seed]")] = None,
    device: DeviceOpt = None,
    overrides: Overrides = None,
):
    """Learn a new task on the device from a distilled student: a new head, then fine-tuning that
    keeps the old task; no image is sent. Writes report.md/json and a model `b2kd export` reads."""
    from b2kd.deploy.adapt import adapt_run, load_adapt_config

    names = None if classes is None else [c.strip() for c in classes.split(",") if c.strip()]
    cfg = load_adapt_config(run_dir, {"adapt.labelled": labelled, "adapt.shots": shots, "adapt.test": test,
                                      "adapt.classes": names, "adapt.seed": seed, "device": device},
                            overrides)
    out_dir = Path(out) if out is not None else run_dir / "adapt"
    r = adapt_run(run_dir, cfg.adapt.labelled, cfg.adapt.shots, out_dir, cfg, log=console.print)
    new, old = r["new_task"], r["old_task"]
    console.print(f"new task: head {_pct(new['head_acc'])} | fine-tuned {_pct(new['finetuned_acc'])}"
                  f" (chance {_pct(new['chance'])}) | old task {_pct(old['before_acc'])} -> "
                  f"{_pct(old['after_acc'])} | queries {r['queries']}", highlight=False)
    console.print(f"report -> {out_dir / 'report.md'}; `b2kd export {out_dir}` exports the new task's model",
                  markup=False, highlight=False)


@app.command("predict")
@friendly
def predict_cmd(
    model: Annotated[Path, typer.Argument(help="an exported model (student.onnx or student.int8.onnx)")],
    images: Annotated[Path, typer.Argument(help="an image file, or a folder of images")],
    threads: Annotated[int, typer.Option(help="onnxruntime threads")] = 1,
):
    """Classify an image, or every image in a folder, with an exported model: class and probability."""
    from b2kd.deploy.predict import predict_files

    for p in predict_files(model, images, threads):
        console.print(f"{p.file}: class {p.label} (probability {p.probability:.3f})",
                      markup=False, highlight=False)


@app.command("audit")
@friendly
def audit_cmd(
    run_dir: RunDir,
    holdout: Annotated[int, typer.Option(help="held-out real images that set the near-copy threshold")] = 1000,
    quantile: Annotated[float, typer.Option(help="threshold quantile of the held-out distances")] = 0.0,
):
    """Compare every image a run sent with the private images; near-copies, a PNG grid, a verdict."""
    from b2kd.evaluate.audit import audit_run

    r = audit_run(run_dir, holdout=holdout, quantile=quantile)
    console.print(f"sent {r['queries']} images ({r['bytes_sent'] / 1e6:.2f} MB); near-copies of private"
                  f" images: {r['near_copies']} ({100 * r['near_copy_fraction']:.2f}%)", highlight=False)
    console.print(r["verdict"], markup=False, highlight=False)
    console.print(f"report -> {run_dir / 'audit.md'} (closest pairs: {r['grid']})")


@app.command()
@friendly
def bench(
    bench_file: Annotated[Path, typer.Argument(help="a bench YAML file (configs/bench-*.yaml)")],
    out: Annotated[Path | None, typer.Option(help="bench directory [the file's out]")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="run the cells as Ray tasks (pip install 'b2kd[cluster]');"
                                      " a local Ray unless --ray-address or RAY_ADDRESS")] = False,
    ray_address: Annotated[str | None, typer.Option(
        help="with --ray: a running cluster, e.g. auto or ray://HEAD:10001")] = None,
):
    """Run a matrix of methods x responses x budgets x seeds (x gaps); finished cells are kept."""
    from b2kd.bench.report import render_report
    from b2kd.bench.run import run_bench

    if bench_file.is_file():
        check_yaml(bench_file)
    if ray or ray_address:
        from b2kd.bench.on_ray import run_bench_ray

        bench_dir, rows = run_bench_ray(bench_file, out, ray_address, log=console.print)
    else:
        bench_dir, rows = run_bench(bench_file, out, log=console.print)
    failed = [r for r in rows if r.get("status") != "ok"]
    report = render_report(bench_dir)
    console.print(f"{len(rows) - len(failed)} cells done, {len(failed)} failed; results in"
                  f" {bench_dir / 'results.csv'}, report in {report}")
    if failed:
        raise typer.Exit(1)


@app.command("report")
@friendly
def report_cmd(
    bench_dir: Annotated[Path, typer.Argument(help="a bench directory (holds results.json)")],
    out: Annotated[Path | None, typer.Option(help="where report.md and the plots go [BENCH_DIR]")] = None,
):
    """Render a bench's results: Markdown table (mean ± std over seeds) and accuracy plots."""
    from b2kd.bench.report import render_report

    console.print(f"report: {render_report(bench_dir, out)}")


@app.command()
@friendly
def serve(
    config: ConfigOpt = None,
    out: Annotated[str | None, typer.Option(help="server directory: state.sqlite, access.log [out]")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="teacher checkpoint [teacher.checkpoint]")] = None,
    host: Annotated[str | None, typer.Option(help="[serve.host]")] = None,
    port: Annotated[int | None, typer.Option(help="0 for any free port [serve.port]")] = None,
    response: Annotated[str | None, typer.Option(
        help="soft, hard, topk:K, rounded:D; embedding (= soft+embedding) or KIND+embedding also"
             " answers the penultimate-layer embedding [serve.response]")] = None,
    api_key: Annotated[list[str] | None, typer.Option(
        "--api-key", help="KEY or KEY:QUOTA, repeatable (visible in ps: prefer --api-key-file or"
                          " B2KD_SERVE_KEYS); none: open [serve.api_keys]")] = None,
    key_outputs: Annotated[list[str] | None, typer.Option(
        "--key-outputs", help="KEY=OUTPUT[,OUTPUT...]: the outputs that key may read, e.g."
                              " KEY=probabilities keeps the embedding from it; repeatable"
                              " [serve.key_outputs]")] = None,
    api_key_file: Annotated[str | None, typer.Option(
        help="a file of keys, one KEY or KEY:QUOTA a line [serve.api_key_file]")] = None,
    store: Annotated[str | None, typer.Option(
        help="quotas and replay records: postgresql://USER@HOST/DB for several hosts;"
             " default OUT/state.sqlite [serve.store]")] = None,
    rate_limit: Annotated[float | None, typer.Option(help="requests/s per key [serve.rate_limit]")] = None,
    max_batch: Annotated[int | None, typer.Option(help="images per request [serve.max_batch]")] = None,
    overrides: Overrides = None,
):
    """Serve a teacher over the Open Inference Protocol (KServe v2) with API keys and quotas."""
    from b2kd.provider.serve import serve as run_server

    cfg = _config(config, {"out": out, "teacher.checkpoint": checkpoint, "serve.host": host,
                           "serve.port": port, "serve.response": response, "serve.api_keys": api_key,
                           "serve.key_outputs": key_outputs,
                           "serve.api_key_file": api_key_file, "serve.store": store,
                           "serve.rate_limit": rate_limit, "serve.max_batch": max_batch}, overrides)
    run_server(cfg, log=console.print)


@app.command()
@friendly
def demo(
    config: ConfigOpt = Path("configs/demo.yaml"),
    out: Annotated[str, typer.Option(help="run directory")] = "runs/demo",
    teacher_url: TeacherUrlOpt = None,
    api_key: ApiKeyOpt = None,
    overrides: Overrides = None,
):
    """The whole story offline on the config's dataset [data.dataset]: teacher, deprivatize,
    MEKD soft and hard, report."""
    from b2kd.demo import run_demo

    cfg = _config(config, {"out": out, "teacher.url": teacher_url, "teacher.api_key": api_key}, overrides)
    run_demo(cfg, Path(cfg.out), console)


def main() -> None:
    app(prog_name="b2kd")


if __name__ == "__main__":
    sys.exit(main())
