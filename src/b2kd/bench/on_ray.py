"""`b2kd bench FILE --ray`: the bench's cells as Ray tasks, on a running cluster or a local one.

The semantics are the sequential bench's (:mod:`b2kd.bench.run`): the same cells, run
directories and results.csv rows, in the same order; a finished cell is read back and
not run again; a failed cell (or a task whose worker died) is recorded and the rest go on.

Order of work:

1. the teacher, if the bench trains one, and then the GAN of every (gap, seed) that a
   generator method needs, each as a task, all finished before any cell starts: two
   cells of one (gap, seed) never train the same GAN;
2. every unfinished cell as one task (one GPU per task when the config's device is
   cuda, else one CPU), all in flight at once; Ray places them.

Cells of one (gap, seed) share its response ledger while they run at the same time.
That ledger is written under a file lock (:class:`b2kd.edge.cache.SharedCache`):
an image is paid by whichever cell asks first and read by the others, so the sweep
pays what the sequential bench pays, and each cell still counts every query it used.
Every process must see OUT at the same path (one machine, or a shared file system),
and b2kd must be installed on every node.
"""

from __future__ import annotations

import json
from pathlib import Path

from b2kd.bench.run import (
    FIELDS,
    generator_of,
    plan,
    prepare_bench,
    run_cell,
    uses_generator,
    write_results,
)
from b2kd.core.config import ConfigError
from b2kd.distill.methods import get_method

__all__ = ["FIELDS", "run_bench_ray"]


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("b2kd bench --ray needs Ray: pip install 'b2kd[cluster]'") from None
    return ray


def _options(device: str, cluster_gpus: float) -> dict:
    """One GPU per task when the cells train on CUDA ("auto": when the cluster has GPUs), else
    one CPU; no retry (a cell that failed is recorded, as in the sequential bench)."""
    gpu = device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)
    if gpu and cluster_gpus < 1:  # Ray would wait for a GPU for ever
        raise ConfigError(f"the cells' device is '{device}' but the Ray cluster has no GPU")
    return {"num_cpus": 1, "num_gpus": 1 if gpu else 0, "max_retries": 0}


def _train_teacher(cfg, directory) -> None:
    from b2kd.pipeline import run_teacher

    run_teacher(cfg, directory, log=lambda *_: None)


def _quiet(*args, **kwargs) -> None:
    pass


def _gan_task(bench, base, gap, seed, teacher, out):
    return generator_of(bench, base, gap, seed, teacher, out, _quiet)


def run_bench_ray(path: str | Path, out: str | Path | None = None, address: str | None = None,
                  log=print) -> tuple[Path, list[dict]]:
    """Run (or finish) every cell of the bench file as Ray tasks; the bench directory and its rows.

    ``address``: a running cluster ("auto", "ray://HOST:10001", ...); None joins the cluster
    named by RAY_ADDRESS, else starts a local one. An already initialised Ray is used as it is.
    """
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)

    from b2kd.bench.run import cell_config, load_bench

    bench, base = load_bench(path)
    device = cell_config(bench, base, bench.gaps[0], bench.methods[0], bench.methods[0].responses[0],
                         bench.budgets[0], bench.seeds[0], None, None).device
    options = _options(device, ray.cluster_resources().get("GPU", 0))

    def remote(fn):
        return ray.remote(**options)(fn)

    bench, base, out, teacher = prepare_bench(
        path, out, log, train_teacher=lambda cfg, d: ray.get(remote(_train_teacher).remote(cfg, d)))

    # 1. every GAN before any cell
    gans: dict[tuple[str, int], tuple[str | None, int, str | None]] = {}
    if uses_generator(bench):
        pending = {(gap.name, seed): remote(_gan_task).remote(bench, base, gap, seed, teacher, out)
                   for gap in bench.gaps for seed in bench.seeds}
        log(f"deprivatize: {len(pending)} generators (one per gap and seed) before the cells")
        for key, ref in pending.items():
            try:
                gans[key] = ray.get(ref)
            except Exception as error:  # noqa: BLE001 - the worker died: its cells fail, the rest go on
                gans[key] = (None, 0, f"deprivatize failed: {type(error).__name__}: {error}")
            if gans[key][2]:
                log(gans[key][2])

    # 2. every unfinished cell at once; rows kept in the bench's order
    rows: list[dict | None] = []
    refs = {}
    for gap in bench.gaps:
        for seed in bench.seeds:
            generator, setup_queries, gan_error = gans.get((gap.name, seed), (None, 0, None))
            for spec, response, budget, cell, row in plan(bench, out, gap, seed):
                done = cell / "result.json"
                if done.is_file():
                    rows.append(json.loads(done.read_text()))
                elif get_method(spec.name).source == "generator" and gan_error:
                    rows.append({**row, "status": "failed", "error": gan_error})
                else:
                    ref = remote(run_cell).remote(bench, base, gap, spec, response, budget, seed,
                                                          teacher, generator, setup_queries, cell, row, _quiet)
                    refs[ref] = (len(rows), row, f"{gap.name}/{cell.name}")
                    rows.append(None)
    log(f"{len(refs)} cells submitted to Ray, {len(rows) - len(refs)} read back or failed before")
    waiting = list(refs)
    while waiting:
        finished, waiting = ray.wait(waiting, num_returns=1)
        index, row, name = refs[finished[0]]
        try:
            rows[index] = ray.get(finished[0])
        except Exception as error:  # noqa: BLE001 - the worker died: recorded like any failed cell
            rows[index] = {**row, "status": "failed", "error": f"{type(error).__name__}: {error}"}
        result = rows[index]
        if result["status"] == "ok":
            log(f"{name}: acc {result['student_acc']:.4f} queries {result['queries']}"
                f" ({result['seconds']:.0f}s)")
        else:
            log(f"FAILED {name}: {result['error']}")
        write_results(out, [r for r in rows if r is not None])
    write_results(out, rows)
    return out, rows
