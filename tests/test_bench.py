"""`b2kd bench` and `b2kd report` at toy scale, the shared response cache, and private-set shifts."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from b2kd.bench.report import render_report, summarise
from b2kd.bench.run import load_bench, run_bench
from b2kd.blackbox import LocalBackend
from b2kd.cli import app
from b2kd.core.config import ConfigError, load_config
from b2kd.data.shift import CORRUPTIONS, corrupt, imbalance
from b2kd.edge import BlackBoxTeacher, Ledger
from b2kd.edge.cache import SharedCache
from b2kd.pool.paid import sample_private

BUDGETS = [40, 80]


@pytest.fixture
def toy_bench(toy_runs, tmp_path):
    """A bench file over the toy runs' teacher and tiny MNIST: KN and KD, 2 budgets, 2 seeds."""
    base = toy_runs["cfg"].model_dump(mode="json")
    base["deprivatize"]["generator"] = None
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    bench = {
        "base": "base.yaml",
        "out": str(tmp_path / "out"),
        "set": {"distill.steps": 6, "distill.batch_size": 16, "distill.lr": 0.02},
        "methods": [{"name": "kn", "responses": ["soft"]}, {"name": "kd", "responses": ["soft"]}],
        "budgets": BUDGETS,
        "seeds": [0, 1],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return path


def _cells_run(log_lines: list[str]) -> list[str]:
    return [line for line in log_lines if ": acc " in line]


def test_matrix_runs_resumes_without_redoing_cells_and_reports(toy_bench, tmp_path):
    lines: list[str] = []

    def interrupt_after_three(message: str) -> None:
        lines.append(message)
        if len(_cells_run(lines)) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(toy_bench, log=interrupt_after_three)
    assert len(_cells_run(lines)) == 3

    again: list[str] = []
    out, rows = run_bench(toy_bench, log=again.append)
    assert len(_cells_run(again)) == 8 - 3  # the three finished cells were read back, not re-run
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert {(r["method"], r["budget"], r["seed"]) for r in rows} == {
        (m, b, s) for m in ("kn", "kd") for b in BUDGETS for s in (0, 1)}
    for row in rows:
        assert row["queries"] == row["budget"]  # each cell accounts for every query it used
        assert row["bytes_sent"] == row["budget"] * 28 * 28
    # every row holds what its cell's own report says (the resumed cells' rows were read back)
    cells = {}
    for done in (out / "cells" / "none").glob("*/result.json"):
        row = json.loads(done.read_text())
        cells[(row["method"], row["budget"], row["seed"])] = json.loads(
            (done.parent / "report.json").read_text())
    assert len(cells) == 8
    for row in rows:
        report = cells[(row["method"], row["budget"], row["seed"])]
        assert row["student_acc"] == report["student_acc"] == report["best"]["acc"]
        assert row["student_acc_last"] == report["latest"]["acc"]
        assert row["fidelity"] == report["fidelity"] and row["teacher_acc"] == report["teacher_acc"]
    # one shared ledger per seed: the sweep paid for its largest pool only, once for both methods
    for seed in (0, 1):
        with Ledger(out / "shared" / "none" / f"paid-s{seed}.sqlite") as ledger:
            assert ledger.count() == max(BUDGETS)

    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 9 and csv_lines[0].startswith("gap,method,white_box,response,budget,seed")
    assert len(json.loads((out / "results.json").read_text())) == 8

    report = render_report(out)
    text = report.read_text()
    assert "| KN | soft | 40 | 2 |" in text and "| KD | soft | 80 | 2 |" in text
    assert "teacher" in text
    pytest.importorskip("matplotlib")
    assert (out / "accuracy-none.png").stat().st_size > 1000


def test_a_row_names_the_threads_its_cell_ran_with(toy_bench):
    """The first cell of a bench process sets the bench's ``threads``; its row says so (it used
    to name the process's count from before the cell)."""
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    bench = yaml.safe_load(toy_bench.read_text())
    bench.update(methods=bench["methods"][:1], budgets=[40], seeds=[0])
    bench["set"]["threads"] = want
    toy_bench.write_text(yaml.safe_dump(bench))
    try:
        _, rows = run_bench(toy_bench, log=lambda *_: None)
    finally:
        torch.set_num_threads(before)
    assert rows[0]["status"] == "ok" and rows[0]["hardware"].endswith(f" {want} threads")


def test_summary_is_mean_and_std_over_seeds():
    rows = [{"gap": "none", "method": "kd", "white_box": False, "response": "soft", "budget": 10,
             "seed": s, "status": "ok", "student_acc": a, "student_acc_last": a, "fidelity": a,
             "queries": 10, "bytes_sent": 7840, "seconds": 1.0, "teacher_acc": 0.99}
            for s, a in enumerate([0.5, 0.7])]
    rows.append({**rows[0], "seed": 2, "status": "failed", "method": "kd"})
    (line,) = summarise(rows)
    assert line["seeds"] == 2 and line["failed"] == 1
    assert line["acc"][0] == pytest.approx(0.6) and line["acc"][1] == pytest.approx(0.1414213, rel=1e-5)


def test_white_box_methods_are_labelled(toy_runs):
    from b2kd.bench.report import label

    assert label({"method": "dafl", "white_box": True, "response": "soft"}) == "DAFL (white-box) soft"
    assert label({"method": "kn", "white_box": False, "response": "hard"}) == "KN hard"


def test_failed_cell_is_reported_and_the_rest_go_on(toy_bench):
    bench = yaml.safe_load(toy_bench.read_text())
    bench["methods"].append({"name": "ml", "responses": ["soft"], "set": {"distill.student": "no_such_net"}})
    bench["seeds"] = [0]
    toy_bench.write_text(yaml.safe_dump(bench))
    lines: list[str] = []
    out, rows = run_bench(toy_bench, log=lines.append)
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["method"] for r in failed} == {"ml"} and len(failed) == len(BUDGETS)
    assert "no_such_net" in failed[0]["error"]
    assert sum(r["status"] == "ok" for r in rows) == 2 * len(BUDGETS)
    assert any(line.startswith("FAILED") for line in lines)
    assert "failed" in render_report(out).read_text()


@pytest.mark.parametrize("change, message", [
    ({"methods": [{"name": "nope"}]}, "unknown method 'nope'"),
    ({"budgets": [0]}, "budgets must be positive"),
    ({"surprise": 1}, "invalid bench file"),
    ({"set": {"distill.lr": "fast"}}, "distill.lr"),
    ({"methods": [{"name": "kn"}, {"name": "kn"}]}, "more than once"),
])
def test_bad_bench_files_are_refused_before_anything_runs(toy_bench, change, message):
    bench = {**yaml.safe_load(toy_bench.read_text()), **change}
    toy_bench.write_text(yaml.safe_dump(bench))
    with pytest.raises(ConfigError, match=message):
        load_bench(toy_bench)


def test_cli_bench_and_report(toy_bench, tmp_path):
    bench = yaml.safe_load(toy_bench.read_text())
    bench.update(seeds=[0], budgets=[40])
    toy_bench.write_text(yaml.safe_dump(bench))
    runner = CliRunner()
    result = runner.invoke(app, ["bench", str(toy_bench)])
    assert result.exit_code == 0, result.output
    assert "2 cells done, 0 failed" in result.output
    result = runner.invoke(app, ["report", bench["out"], "--out", str(tmp_path / "rendered")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rendered" / "report.md").is_file()
    missing = runner.invoke(app, ["bench", str(tmp_path / "missing.yaml")])
    assert missing.exit_code == 2 and "bench file not found" in missing.output
    empty = runner.invoke(app, ["report", str(tmp_path)])
    assert empty.exit_code == 2 and "no results.json" in empty.output


# --- the shared cache of a sweep -----------------------------------------------------------


class CountingBackend(LocalBackend):
    calls = 0

    def infer(self, images):
        CountingBackend.calls += len(images)
        return super().infer(images)


def test_shared_cache_pays_once_and_each_run_still_counts_its_queries(toy_runs, tmp_path):
    backend = CountingBackend.from_checkpoint(toy_runs["cfg"].teacher.checkpoint, "soft")
    CountingBackend.calls = 0
    images = torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8)
    shared = Ledger(tmp_path / "shared.sqlite")
    first = BlackBoxTeacher(SharedCache(backend, shared), Ledger(tmp_path / "a.sqlite"), budget=20)
    second = BlackBoxTeacher(SharedCache(backend, shared), Ledger(tmp_path / "b.sqlite"), budget=30)
    a = first.query(images[:20])
    b = second.query(images)
    assert CountingBackend.calls == 30  # the first 20 were answered once, then reused
    assert torch.equal(a, b[:20])
    assert shared.count() == 30 and first.spent == 20 and second.spent == 30
    assert second.ledger.totals()["bytes_sent"] == 30 * 28 * 28  # the bytes the original queries cost


# --- the private set: transfer copies and distribution gaps ---------------------------------


def test_transfer_copies_fill_the_budget_with_shifted_images_and_nest():
    private = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    big, small = sample_private(private, 120, 3, copies=True), sample_private(private, 80, 3, copies=True)
    assert big.shape == (120, 1, 8, 8) and torch.equal(big[:80], small)
    assert torch.equal(big[:50].sort(0).values, private.sort(0).values)  # a full pass first
    assert torch.equal(sample_private(private, 30, 3, copies=True), sample_private(private, 30, 3))
    assert len(sample_private(private, 120, 3)) == 50  # without copies: capped


def test_imbalance_keeps_a_fraction_of_the_listed_classes():
    labels = torch.arange(10).repeat(100)
    keep = imbalance(labels, [5, 6, 7, 8, 9], 0.1, seed=0)
    counts = torch.bincount(labels[keep], minlength=10)
    assert counts[:5].tolist() == [100] * 5 and counts[5:].tolist() == [10] * 5
    assert torch.equal(keep, imbalance(labels, [5, 6, 7, 8, 9], 0.1, seed=0))


def test_corruptions_are_seeded_uint8_and_each_changes_images():
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 8:20, 10:18] = 200
    for kind in CORRUPTIONS:
        out = corrupt(images, seed=1, kinds=(kind,))
        assert out.dtype == torch.uint8 and out.shape == images.shape
        assert (out != images).any(dim=(1, 2, 3)).float().mean() > 0.9, kind
    assert torch.equal(corrupt(images, 1), corrupt(images, 1))
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, 1, ("fog",))


def test_shifted_private_sets_through_the_config(toy_runs):
    from b2kd.data.edge_sets import edge_private_images

    cfg = toy_runs["cfg"].model_copy(deep=True)
    plain = edge_private_images(cfg)
    cfg.data.private_shift = "imbalance"
    assert len(edge_private_images(cfg)) < len(plain)
    cfg.data.private_shift = "corrupt"
    assert edge_private_images(cfg).shape == plain.shape
    cfg.data.corruptions = ["fog"]
    with pytest.raises(ConfigError, match="data.corruptions"):
        edge_private_images(cfg)
    cfg = load_config(None, {"data.private_dataset": "digits", "data.image_size": 28, "data.channels": 1})
    digits = edge_private_images(cfg)
    assert digits.shape[1:] == (1, 28, 28) and digits.dtype == torch.uint8


def test_the_teacher_does_not_depend_on_the_listed_seeds_or_gaps(toy_runs, tmp_path):
    from b2kd.bench.run import prepare_bench

    base = toy_runs["cfg"].model_dump(mode="json")
    base["teacher"]["checkpoint"] = None
    base["seed"] = 4
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    bench = {"base": "base.yaml", "set": {"teacher.epochs": 3},
             "methods": [{"name": "kd", "responses": ["soft"]}], "budgets": [40], "seeds": [1, 2],
             "gaps": [{"name": "imbalance", "set": {"data.private_shift": "imbalance", "seed": 9}}]}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(bench))
    trained = []

    def train_teacher(cfg, out):
        trained.append(cfg)
        out.mkdir(parents=True)
        (out / "teacher.pt").write_bytes(b"")

    *_, teacher = prepare_bench(tmp_path / "bench.yaml", tmp_path / "out", lambda *a: None, train_teacher)
    assert teacher == str((tmp_path / "out" / "teacher" / "teacher.pt").resolve())
    (cfg,) = trained
    # the base's seed and the bench's `set`, not the first cell's seed or gap
    assert cfg.seed == 4 and cfg.teacher.epochs == 3 and cfg.data.private_shift != "imbalance"


def test_an_out_made_with_other_settings_is_refused_and_left_as_it_was(toy_bench):
    bench = yaml.safe_load(toy_bench.read_text())
    bench["methods"], bench["budgets"], bench["seeds"] = [{"name": "kn", "responses": ["soft"]}], [40], [0]
    toy_bench.write_text(yaml.safe_dump(bench))
    out, rows = run_bench(toy_bench, log=lambda *a: None)
    cell = out / "cells" / "none" / "kn-soft-40-s0"

    # where the cell runs, not how: read back as before (no cell runs)
    bench["set"] = {**bench["set"], "threads": 1}
    toy_bench.write_text(yaml.safe_dump(bench))
    lines: list[str] = []
    _, again = run_bench(toy_bench, log=lines.append)
    assert _cells_run(lines) == [] and again == rows
    before = {p: p.read_bytes() for p in [out / "bench.yaml", cell / "result.json", cell / "config.yaml"]}

    # how the cell learns: refused, naming the cell and the setting, and nothing touched
    bench["set"]["distill.lr"] = 0.05
    toy_bench.write_text(yaml.safe_dump(bench))
    with pytest.raises(ConfigError, match=r"kn-soft-40-s0 \(distill.lr: 0.02 -> 0.05\)") as error:
        run_bench(toy_bench, log=lambda *a: None)
    assert "another --out" in str(error.value)
    assert {p: p.read_bytes() for p in before} == before


def test_a_shared_gan_made_with_another_schedule_is_refused(toy_bench, toy_runs):
    from b2kd.bench.run import gan_dir, prepare_bench
    from b2kd.core.config import save_config

    bench = yaml.safe_load(toy_bench.read_text())
    bench["methods"], bench["budgets"], bench["seeds"] = [{"name": "mekd", "responses": ["soft"]}], [40], [0, 1]
    bench["set"] = {**bench["set"], "deprivatize.epochs": 2}
    toy_bench.write_text(yaml.safe_dump(bench))
    loaded, base = load_bench(toy_bench)
    out = toy_bench.parent / "out"
    # seed 1's GAN as this bench file makes it; seed 0's made with 3 epochs, and another alpha
    for seed, epochs, alpha in ((1, 2, None), (0, 3, 0.0)):
        options = {**bench["set"], "seed": seed, "deprivatize.epochs": epochs,
                   "teacher.checkpoint": toy_runs["cfg"].teacher.checkpoint}
        if alpha is not None:
            options["deprivatize.alpha"] = alpha
        save_config(load_config(base, options), gan_dir(out, loaded.gaps[0], seed) / "config.yaml")
    with pytest.raises(ConfigError) as error:
        prepare_bench(toy_bench, out, lambda *a: None)
    message = str(error.value)
    assert message.startswith("1 directory in this bench's OUT was made with other settings")
    assert "gan-s0 (deprivatize.alpha: 0.0 -> 0.5; deprivatize.epochs: 3 -> 2)" in message
    assert "gan-s1" not in message
    assert not (out / "bench.yaml").exists()  # refused before anything was written


def test_by_response_sets_one_responses_cells_only(toy_bench):
    from b2kd.bench.run import cell_config

    bench = yaml.safe_load(toy_bench.read_text())
    bench["methods"] = [{"name": "mekd", "responses": ["soft", "hard"], "set": {"distill.lr": 0.03},
                         "by_response": {"soft": {"distill.balance_realism": 0.5}}}]
    toy_bench.write_text(yaml.safe_dump(bench))
    loaded, base = load_bench(toy_bench)
    spec, gap = loaded.methods[0], loaded.gaps[0]
    soft, hard = (cell_config(loaded, base, gap, spec, r, 40, 0, None, None) for r in ("soft", "hard"))
    assert soft.distill.balance_realism == 0.5 and hard.distill.balance_realism == 0.0
    assert soft.distill.lr == hard.distill.lr == 0.03
    # a response the method does not run, or a key that would split the shared GAN, is refused
    for by_response, message in (({"hard:1": {"distill.lr": 0.1}}, "not among its responses"),
                                 ({"hard": {"deprivatize.epochs": 3}}, "distill.\\* keys only")):
        bench["methods"][0]["by_response"] = by_response
        toy_bench.write_text(yaml.safe_dump(bench))
        with pytest.raises(ConfigError, match=message):
            load_bench(toy_bench)
