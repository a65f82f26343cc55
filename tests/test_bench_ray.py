"""`b2kd bench --ray`: cells as Ray tasks on a 2-worker local Ray, and the shared ledger under
concurrent writers.

The bench (KN, KD and MEKD at two budgets, plus KD on hard answers, which fails) is run once
sequentially and once on Ray; the rows must be the same, cell for cell. The shared ledger's
file lock is tested on its own: two processes paying for the same images at the same moment
send each image to the teacher once.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from b2kd.blackbox import LocalBackend
from b2kd.edge import Ledger
from b2kd.edge.cache import SharedCache

ray = pytest.importorskip("ray", reason="the cluster extra: pip install 'b2kd[cluster]'")


class _Counting:
    """A local teacher that counts the images it is sent and answers slowly (a wide race window)."""

    def __init__(self, backend: LocalBackend):
        self.backend, self.sent = backend, 0
        self.kind, self.num_classes, self.image_shape = backend.kind, backend.num_classes, backend.image_shape

    def infer(self, images):
        self.sent += len(images)
        time.sleep(0.05)
        return self.backend.infer(images)


def _pay(ledger: str, images: str, barrier, count: str) -> None:
    from toy import toy_model

    torch.set_num_threads(1)
    backend = _Counting(LocalBackend(toy_model(), "soft"))
    cache = SharedCache(backend, Ledger(ledger), "distill")
    pool = torch.load(images)
    barrier.wait(timeout=600)  # a loaded machine may take minutes to start a spawned torch process
    for chunk in pool.split(16):
        cache.infer(chunk)
    Path(count).write_text(str(backend.sent))


def test_two_processes_paying_for_the_same_images_at_once_send_each_image_once(tmp_path):
    pool = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    torch.save(pool, tmp_path / "pool.pt")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_pay, args=(str(tmp_path / "shared.sqlite"), str(tmp_path / "pool.pt"), barrier,
                                            str(tmp_path / f"sent-{i}"))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
        assert p.exitcode == 0
    sent = [int((tmp_path / f"sent-{i}").read_text()) for i in range(2)]
    assert sum(sent) == 64, sent  # without the lock both pay for most chunks (measured: 128)
    with Ledger(tmp_path / "shared.sqlite") as ledger:
        assert ledger.count() == 64


BUDGETS = [40, 80]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A 2-worker local Ray whose workers keep decoded datasets where the tests do."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("B2KD_CACHE", os.environ.get("B2KD_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache"))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def gap_bench(toy_runs, tmp_path):
    base = toy_runs["cfg"].model_dump(mode="json")
    base["deprivatize"]["generator"] = None
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    bench = {
        "base": "base.yaml",
        "set": {"distill.steps": 6, "distill.batch_size": 16, "distill.lr": 0.02},
        "methods": [{"name": "kn", "responses": ["soft"]}, {"name": "kd", "responses": ["soft", "hard"]},
                    {"name": "mekd", "responses": ["soft"]}],
        "budgets": BUDGETS,
        "seeds": [0],
    }
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench))
    return tmp_path / "bench.yaml"


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "hardware")} for r in rows]


def test_ray_bench_gives_the_sequential_rows_and_reads_finished_cells_back(local_ray, gap_bench, tmp_path):
    from b2kd.bench.on_ray import run_bench_ray
    from b2kd.bench.run import run_bench

    _, sequential = run_bench(gap_bench, tmp_path / "seq", log=lambda *_: None)
    lines: list[str] = []
    out, rows = run_bench_ray(gap_bench, tmp_path / "ray", log=lines.append)
    assert "deprivatize: 1 generators (one per gap and seed) before the cells" in lines
    assert "8 cells submitted to Ray, 0 read back or failed before" in lines
    assert _comparable(rows) == _comparable(sequential)  # same cells, same order, same figures
    assert [r["status"] for r in rows].count("failed") == 2  # KD on hard answers, both budgets
    assert all("needs soft responses" in r["error"] for r in rows if r["status"] == "failed")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6 and all(r["queries"] == r["budget"] for r in ok)
    assert _csv_rows(out) == _csv_rows(tmp_path / "seq") and len(_csv_rows(out)) == 8
    # the sweep paid for each largest pool once: KN and KD share the private transfer set
    for bench_dir in (out, tmp_path / "seq"):
        with Ledger(bench_dir / "shared" / "none" / "paid-s0.sqlite") as ledger:
            assert ledger.count() == 2 * max(BUDGETS)  # 80 private images + 80 generator images

    again: list[str] = []
    _, rows_again = run_bench_ray(gap_bench, tmp_path / "ray", log=again.append)
    assert "2 cells submitted to Ray, 6 read back or failed before" in again  # the failed cells re-run
    assert _comparable(rows_again) == _comparable(rows)


def _csv_rows(bench_dir: Path) -> list[dict]:
    import csv

    with open(bench_dir / "results.csv") as fh:
        return _comparable(list(csv.DictReader(fh)))
