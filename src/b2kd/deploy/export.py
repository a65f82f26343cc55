"""``b2kd export``: the edge deliverable, ONNX fp32 and INT8, each measured before it ships.

The student's normalisation goes inside the graph, so the device feeds raw
uint8 pixels (or floats in [0, 1] with ``input="float"``) and cannot get the
mean/std wrong. The INT8 model is calibrated on *generator* images (the run's
paid pool, or fresh G samples): calibration must not need a private image,
or the export step would undo what deprivatization bought. Every figure in
``export.md`` is measured through onnxruntime, the way the device runs it.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from b2kd import __version__
from b2kd.core.checkpoint import CheckpointError, read
from b2kd.core.config import Config, ConfigError
from b2kd.core.run_dir import load_run_config
from b2kd.data import load_dataset
from b2kd.deploy.predict import OnnxModel
from b2kd.edge.connect import teacher_checkpoint
from b2kd.models import count_parameters, load_classifier, load_generator
from b2kd.pool.paid import synthesise

# Fixed so that a model exported today loads in the same runtimes tomorrow; 17 is
# supported by onnxruntime >= 1.13 and by the usual device runtimes, and has
# per-channel QuantizeLinear/DequantizeLinear (opset >= 13).
OPSET = 17
INPUTS = ("uint8", "float")
FILES = {
    "fp32": "student.onnx",
    "int8": "student.int8.onnx",
    "int8_dynamic": "student.int8-dynamic.onnx",
}


class _Calibration(CalibrationDataReader):
    """Feeds calibration batches to onnxruntime's static quantizer."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self._feeds = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def export_onnx(model: torch.nn.Module, path: str | Path, input_kind: str = "uint8") -> None:
    """ONNX graph of a b2kd classifier with a dynamic batch axis.

    Tracing with a uint8 example records the classifier's own uint8 branch
    (cast, /255, normalise); a float example records only the normalisation.
    The legacy TorchScript exporter is used: on torch 2.13 it exports LeNet-5
    in 0.2 s against 2.4 s for the dynamo exporter (first export in a process),
    targets opset 17 directly (dynamo builds opset 18 and converts down) and
    needs no onnxscript.
    """
    if input_kind not in INPUTS:
        raise ConfigError(f"unknown input kind '{input_kind}'; choose from: {', '.join(INPUTS)}")
    cfg = model.config
    shape = (1, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    example = torch.zeros(shape, dtype=torch.uint8 if input_kind == "uint8" else torch.float32)
    model = model.eval().cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            model, (example,), str(path), input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )  # fmt: skip
    proto = onnx.load(str(path))
    what = "uint8 pixels 0..255" if input_kind == "uint8" else "float32 in [0, 1]"
    onnx.helper.set_model_props(proto, {
        "b2kd_version": __version__, "arch": model.arch, "num_classes": str(cfg["num_classes"]),
        "input": f"images (N, {shape[1]}, {shape[2]}, {shape[3]}), {what}; normalisation inside",
    })  # fmt: skip
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _quantize(fp32: Path, out: Path, quantize: Callable[[str, str], None]) -> None:
    """Pre-process (shape inference and graph clean-up, as onnxruntime recommends), quantize,
    then drop the shape annotations pre-processing added (the runtime infers them again)."""
    prepared = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(prepared))
    try:
        quantize(str(prepared), str(out))
    finally:
        prepared.unlink(missing_ok=True)
    proto = onnx.load(str(out))
    del proto.graph.value_info[:]
    onnx.save(proto, str(out))


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, batch_size: int = 64) -> None:
    """Static INT8 (QDQ, per-channel weights) calibrated with MinMax on ``calibration`` (uint8).

    uint8 activations with int8 weights, as onnxruntime recommends for x86 CPUs.
    Biases stay fp32 in the file: onnxruntime quantizes them when it fuses the
    QDQ graph into QLinearConv/QGemm (the same kernels, checked), while an
    int32 bias carries a per-channel scale and zero point beside it, three
    times the bytes. With the dropped shape annotations this takes the demo's
    LeNet-5 from 31.0% to 29.3% of the fp32 file, at the same accuracy.
    """
    model = OnnxModel(fp32)
    feeds = model.feed(calibration)
    batches = [feeds[i : i + batch_size] for i in range(0, len(feeds), batch_size)]
    _quantize(fp32, out, lambda src, dst: quantize_static(
        src, dst, _Calibration(model.input_name, batches),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        extra_options={"QuantizeBias": False},
    ))  # fmt: skip


def quantize_int8_dynamic(fp32: Path, out: Path) -> None:
    """Dynamic quantization (int8 weights, activations quantized at run time), for comparison."""
    _quantize(fp32, out, lambda src, dst: quantize_dynamic(
        src, dst, per_channel=True, weight_type=QuantType.QInt8))  # fmt: skip


def measure_latency(
    model: OnnxModel, images: np.ndarray, runs: int = 1000, batch_runs: int = 100
) -> dict:
    """Batch-1 latency percentiles (after warm-up) and batch-64 throughput, on real images."""
    one = model.feed(images[:1])
    for _ in range(20):
        model.run_batch(one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.run_batch(one)
        times.append(time.perf_counter() - start)
    batch = model.feed(np.resize(images, (64, *images.shape[1:])))
    for _ in range(3):
        model.run_batch(batch)
    start = time.perf_counter()
    for _ in range(batch_runs):
        model.run_batch(batch)
    seconds = time.perf_counter() - start
    ms = 1000 * np.asarray(times)
    return {
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p95": float(np.percentile(ms, 95)),
        "batch64_img_per_s": 64 * batch_runs / seconds,
    }


def calibration_images(
    run_dir: Path, cfg: Config, n: int, seed: int, generator: str | None
) -> tuple[np.ndarray, str]:
    """``n`` generator images for calibration and where they came from; never private images.

    The run's paid pool when it was drawn from the generator; otherwise fresh
    samples of ``generator`` (or the run's ``deprivatize.generator``).
    """
    pool_path = run_dir / "pool.pt"
    if generator is None and pool_path.is_file():
        pool = read(pool_path, "pool")
        if pool.get("source", "generator") == "generator":
            images = pool["images"]
            idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
            return images[idx].numpy(), f"{len(idx)} images of the paid pool (generator samples)"
    generator = generator or cfg.deprivatize.generator
    if not generator:
        raise ConfigError(
            f"{run_dir} has no generator images to calibrate INT8 on (its queries were private"
            " images, which calibration must not use): pass --generator PATH"
        )
    gen, _ = load_generator(generator)
    return synthesise(gen, n, seed).numpy(), f"{n} fresh samples of {generator}"


def _scores(logits: np.ndarray, labels: np.ndarray, teacher_pred: np.ndarray | None) -> dict:
    pred = logits.argmax(1)
    return {
        "acc": float((pred == labels).mean()),
        "fidelity": None if teacher_pred is None else float((pred == teacher_pred).mean()),
    }


def _teacher_predictions(cfg: Config, images: torch.Tensor) -> np.ndarray | None:
    """The evaluator's copy of the teacher on the test set, when the run names one."""
    from b2kd.core.metrics import predict

    try:
        teacher, _ = load_classifier(teacher_checkpoint(cfg))
    except (ConfigError, CheckpointError):
        return None
    return predict(teacher, images).numpy()


def _parity(student: torch.nn.Module, fp32: OnnxModel, images: torch.Tensor, log) -> tuple:
    """(ONNX logits, PyTorch logits, how far apart they are) of the fp32 export on the test images."""
    onnx_logits = fp32.logits(images.numpy())
    with torch.no_grad():
        torch_logits = torch.cat([student(b) for b in images.split(1024)]).numpy()
    parity = {
        "images": len(images),
        "max_abs_logit_diff": float(np.abs(onnx_logits - torch_logits).max()),
        "top1_agreement": float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean()),
    }
    log(
        f"fp32 ONNX: max |logit diff| vs PyTorch {parity['max_abs_logit_diff']:.2e},"
        f" top-1 agreement {100 * parity['top1_agreement']:.2f}% on {len(images)} test images"
    )
    return onnx_logits, torch_logits, parity


def _measure(paths: dict[str, Path], fp32: OnnxModel, onnx_logits: np.ndarray, images: torch.Tensor,
             labels: np.ndarray, teacher_pred: np.ndarray | None, threads: int) -> dict[str, dict]:
    """Per exported file: its size, test scores, agreement with fp32 and latency."""
    models: dict[str, dict] = {}
    latency_images = images[:64].numpy()
    for name, path in paths.items():
        model = fp32 if name == "fp32" else OnnxModel(path, threads)
        logits = onnx_logits if name == "fp32" else model.logits(images.numpy())
        models[name] = {
            "file": path.name,
            "bytes": path.stat().st_size,
            **_scores(logits, labels, teacher_pred),
            "top1_agreement_with_fp32": float((logits.argmax(1) == onnx_logits.argmax(1)).mean()),
            **measure_latency(model, latency_images),
        }
    return models


def export_run(
    run_dir: str | Path,
    *,
    input_kind: str = "uint8",
    calibration: int = 512,
    dynamic: bool = False,
    threads: int = 1,
    generator: str | None = None,
    log=print,
) -> dict:
    """Export a run's best student to ONNX fp32 and INT8, measure both, write export.md/json."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = run_dir / "checkpoints" / "best.pt"
    if not ckpt.is_file():
        raise CheckpointError(
            f"{run_dir} has no student (no checkpoints/best.pt): run `b2kd distill` first"
        )
    if input_kind not in INPUTS:
        raise ConfigError(f"unknown input kind '{input_kind}'; choose from: {', '.join(INPUTS)}")
    if calibration < 1:
        raise ConfigError(f"calibration needs at least one image, got {calibration}")
    student, meta = load_classifier(ckpt)
    calib, calib_source = calibration_images(run_dir, cfg, calibration, cfg.seed, generator)
    d = cfg.data
    test = load_dataset(d.dataset, "test", d.root, d.image_size, d.channels)
    labels = test.labels.numpy()
    teacher_pred = _teacher_predictions(cfg, test.images)
    paths = {name: run_dir / FILES[name] for name in FILES}

    start = time.perf_counter()
    export_onnx(student, paths["fp32"], input_kind)
    export_seconds = time.perf_counter() - start
    fp32 = OnnxModel(paths["fp32"], threads)
    onnx_logits, torch_logits, parity = _parity(student, fp32, test.images, log)

    quantize_int8(paths["fp32"], paths["int8"], calib)
    if dynamic:
        quantize_int8_dynamic(paths["fp32"], paths["int8_dynamic"])
    else:
        paths.pop("int8_dynamic")
        (run_dir / FILES["int8_dynamic"]).unlink(missing_ok=True)

    models = _measure(paths, fp32, onnx_logits, test.images, labels, teacher_pred, threads)
    result = {
        "run": str(run_dir),
        "checkpoint": str(ckpt),
        "epoch": meta.get("epoch"),
        "arch": student.arch,
        "params": count_parameters(student),
        "opset": OPSET,
        "input": input_kind,
        "export_seconds": export_seconds,
        "parity": parity,
        "torch": _scores(torch_logits, labels, teacher_pred),
        "calibration": calib_source,
        "threads": threads,
        "onnxruntime": ort.__version__,
        "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "models": models,
    }
    write_export_report(run_dir, result)
    return result


def write_export_report(run_dir: Path, result: dict) -> None:
    (run_dir / "export.json").write_text(json.dumps(result, indent=2))
    p = result["parity"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    lines = [
        f"# b2kd export: {result['arch']} ({result['params']:,} parameters)",
        "",
        (
            f"- ONNX opset {result['opset']}, dynamic batch axis, input {result['input']}"
            " (normalisation inside the graph)"
        ),
        (
            f"- parity with PyTorch on {p['images']} test images: max |logit diff|"
            f" {p['max_abs_logit_diff']:.2e}, top-1 agreement {pct(p['top1_agreement'])}"
        ),
        (
            f"- PyTorch student: test acc {pct(result['torch']['acc'])},"
            f" fidelity {pct(result['torch']['fidelity'])}"
        ),
        f"- INT8 calibration: {result['calibration']} (static, QDQ, per-channel, MinMax)",
        (
            f"- latency: onnxruntime {result['onnxruntime']}, {result['threads']} thread(s) on"
            f" {result['hardware']}; batch 1 after warm-up, and batch 64"
        ),
        "",
        "| model | file | size KB | test acc | fidelity | agree fp32 | p50 ms | p95 ms | batch-64 img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["models"].items():
        lines.append(
            f"| {name} | {m['file']} | {m['bytes'] / 1024:.1f} | {pct(m['acc'])} | {pct(m['fidelity'])}"
            f" | {pct(m['top1_agreement_with_fp32'])} | {m['latency_ms_p50']:.3f} | {m['latency_ms_p95']:.3f}"
            f" | {m['batch64_img_per_s']:.0f} |"
        )
    (run_dir / "export.md").write_text("\n".join(lines) + "\n")
