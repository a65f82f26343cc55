"""A run directory holds one run: re-running into it with other settings is refused before anything
is paid or written; the identical command resumes; a refused run leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_cli import assert_ok, assert_user_error, invoke, ledger_rows
from toy import make_toy, toy_model

from b2kd.core.checkpoint import save_generator
from b2kd.models import Generator


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = make_toy(tmp_path_factory.mktemp("run-dir-toy"), toy_model())
    torch.manual_seed(1)  # another generator, as a second GAN would be
    save_generator(Generator(10, 28, 1, (16, 8)), root / "other-generator.pt")
    return root


def distill_args(toy: Path, out: Path, *extra) -> list:
    return ["distill", "--config", toy / "toy.yaml", "--teacher", toy / "teacher.pt",
            "--generator", toy / "generator.pt", "--out", out, *extra]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(out: Path) -> dict[str, str]:
    """What a refused re-run must leave as it was: config, ledger, pool and the student."""
    return {name: digest(out / name) for name in
            ("config.yaml", "inputs.json", "ledger.sqlite", "pool.pt", "checkpoints/latest.pt")}


@pytest.fixture(scope="module")
def finished(toy, tmp_path_factory):
    """A finished toy distillation (200 queries) and what its directory held after it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert_ok(invoke(*distill_args(toy, out)))
    return out, snapshot(out), ledger_rows(out / "ledger.sqlite")


CHANGES = {
    # case: (extra arguments of the re-run, what the error says; the old values are the toy's defaults)
    "generator": (["--generator", "{toy}/other-generator.pt"],
                  ("deprivatize.generator: another file", "generator.pt -> ", "other-generator.pt")),
    "method": (["--method", "kn"], ("distill.method: 'mekd' -> 'kn'",)),
    "lr": (["distill.lr=0.0123"], ("distill.lr: ", " -> 0.0123")),
    "budget": (["--budget", "500"], ("distill.budget: 200 -> 500",)),
    "pool": (["distill.pool=balanced", "distill.balance_first=0.5"], ("distill.balance_first: ", "-> 0.5")),
    "response": (["--response", "hard"], ("distill.response: 'soft' -> 'hard'",)),
    "val_fraction": (["distill.val_fraction=0.1"], ("distill.val_fraction: ", "-> 0.1")),
    "tau": (["distill.tau=2.5"], ("distill.tau: ", "-> 2.5")),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_a_rerun_with_other_settings_is_refused_and_pays_nothing(toy, finished, case):
    out, before, rows = finished
    extra, needles = CHANGES[case]
    result = invoke(*distill_args(toy, out, *[e.replace("{toy}", str(toy)) for e in extra]))
    assert_user_error(result, f"{out} holds a distill run made with other settings", *needles,
                      "nothing was paid or written")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert snapshot(out) == before  # config.yaml, ledger, pool and student untouched
    assert ledger_rows(out / "ledger.sqlite") == rows


def test_the_identical_command_and_settings_that_change_no_product_resume(toy, finished):
    out, before, rows = finished
    # threads, device and the torchrun section change no product: the run resumes (finished: no epoch)
    result = invoke(*distill_args(toy, out, "threads=2", "--device", "cpu", "distributed.timeout_s=5"))
    assert_ok(result)
    assert "images/s" not in result.stdout  # nothing was trained again
    assert ledger_rows(out / "ledger.sqlite") == rows
    assert snapshot(out) == before  # config.yaml still says the run that made the directory
    moved = out.parent / "moved-generator.pt"  # the same generator elsewhere is the same input
    shutil.copy(toy / "generator.pt", moved)
    assert_ok(invoke(*distill_args(toy, out, "--generator", moved)))


def test_a_finished_run_rerun_with_a_larger_budget_pays_nothing(toy, finished):
    out, _, rows = finished
    result = invoke(*distill_args(toy, out, "--budget", "500"))
    assert_user_error(result, "distill.budget: 200 -> 500")
    assert ledger_rows(out / "ledger.sqlite") == rows  # before: 300 more queries, never trained on


def test_deprivatize_and_teacher_train_refuse_other_settings_too(toy, tmp_path):
    gan = tmp_path / "gan"
    args = ["deprivatize", "--config", toy / "toy.yaml", "--teacher", toy / "teacher.pt", "--out", gan]
    assert_ok(invoke(*args))
    rows = ledger_rows(gan / "ledger.sqlite")
    assert_user_error(invoke(*args, "--max-queries", "80"), "deprivatize.max_queries: 40 -> 80")
    assert_user_error(invoke(*args[:3], "--teacher", toy / "generator.pt", *args[5:]), "holds a generator")
    assert ledger_rows(gan / "ledger.sqlite") == rows
    teacher = tmp_path / "teacher"
    train = ["teacher", "train", "--config", toy / "toy.yaml", "--out", teacher, "--epochs", "1",
             "teacher.arch=lenet5"]
    assert_ok(invoke(*train))
    stamp = (teacher / "teacher.pt").stat().st_mtime_ns
    assert_user_error(invoke(*train[:-1], "teacher.arch=cnn_small"), "teacher.arch: 'lenet5' -> 'cnn_small'")
    assert (teacher / "teacher.pt").stat().st_mtime_ns == stamp
    assert_ok(invoke(*train, "threads=2"))  # a thread count is no other teacher


def test_a_stored_config_that_cannot_be_read_is_refused_not_overwritten(toy, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("distill: [unclosed\n")
    assert_user_error(invoke(*distill_args(toy, out)), f"cannot read {out / 'config.yaml'}")
    assert (out / "config.yaml").read_text() == "distill: [unclosed\n"


# --- every input is checked before the first query; a refused run leaves nothing ------------------


def truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def test_out_that_is_a_file_or_under_one_is_one_line(toy, tmp_path):
    (tmp_path / "a-file").write_text("x")
    assert_user_error(invoke(*distill_args(toy, tmp_path / "a-file")), "is a file, not a directory")
    assert_user_error(invoke(*distill_args(toy, tmp_path / "a-file" / "run" / "deeper")),
                      f"cannot create --out {tmp_path / 'a-file' / 'run' / 'deeper'}: {tmp_path / 'a-file'} is a file")
    for command in (["deprivatize", "--teacher", toy / "teacher.pt"], ["teacher", "train"], ["demo"],
                    ["serve", "--checkpoint", toy / "teacher.pt", "--port", "0"]):
        result = invoke(*command, "--config", toy / "toy.yaml", "--out", tmp_path / "a-file")
        assert_user_error(result, "a-file is a file, not a directory")
    assert (tmp_path / "a-file").read_text() == "x"


def test_out_that_cannot_be_written_is_one_line(toy, tmp_path):
    if os.geteuid() == 0:  # root writes into any folder whose mode says no: /proc takes no files
        assert_user_error(invoke(*distill_args(toy, Path("/proc/b2kd-test-run"))), "cannot write in /proc")
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert_user_error(invoke(*distill_args(toy, locked / "run")), f"cannot write in {locked}")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("what", ["teacher", "generator", "discriminator", "ledger"])
def test_a_truncated_input_is_one_line_and_nothing_is_left_behind(toy, finished, tmp_path, what):
    out = tmp_path / "run"
    teacher, generator = toy / "teacher.pt", toy / "generator.pt"
    extra: list = []
    if what == "teacher":
        teacher, needle = truncated(teacher, tmp_path / "teacher.pt"), "cannot read checkpoint"
    elif what == "generator":
        generator, needle = truncated(generator, tmp_path / "generator.pt"), "cannot read checkpoint"
    elif what == "discriminator":  # read when the balanced pool filters by realism
        gan = tmp_path / "gan"
        gan.mkdir()
        generator = Path(shutil.copy(toy / "generator.pt", gan / "generator.pt"))
        truncated(toy / "teacher.pt", gan / "discriminator.pt")
        extra, needle = ["distill.pool=balanced", "distill.balance_realism=0.5"], "discriminator.pt"
    else:
        out.mkdir()
        truncated(finished[0] / "ledger.sqlite", out / "ledger.sqlite")
        needle = "is damaged"
    before = sorted(os.listdir(out)) if out.exists() else None
    result = invoke("distill", "--config", toy / "toy.yaml", "--teacher", teacher, "--generator", generator,
                    "--out", out, *extra)
    assert_user_error(result, needle)
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert (sorted(os.listdir(out)) if out.exists() else None) == before  # no config.yaml, ledger, pool


def test_a_run_refused_after_opening_the_teacher_leaves_nothing_behind(toy, tmp_path):
    """A check that needs the teacher (its image size) fails after its ledger was opened: the run
    paid nothing, so neither the ledger nor config.yaml nor the folder stays."""
    big = Generator(10, 32, 1, (16, 8))
    save_generator(big, tmp_path / "generator-32.pt")
    out = tmp_path / "nested" / "run"
    result = invoke("distill", "--config", toy / "toy.yaml", "--teacher", toy / "teacher.pt",
                    "--generator", tmp_path / "generator-32.pt", "--out", out)
    assert_user_error(result, "but the teacher takes")
    assert not (tmp_path / "nested").exists()


def test_provider_settings_not_given_are_inherited_by_the_rules(tmp_path):
    """The run's own config.yaml decides before the generator's; a setting given is kept; the URL
    only when no teacher is named; the rest only for a served teacher; never the API key."""
    import yaml

    from b2kd.core.config import ConfigError, load_config, save_config
    from b2kd.core.run_dir import inherit_provider

    def stored(name: str, **teacher) -> Path:
        save_config(load_config(None, None, [f"teacher.{k}={v}" for k, v in teacher.items()]),
                    tmp_path / name / "config.yaml")
        return tmp_path / name

    gan = stored("gan", url="http://h:1/v2/models/t", input_preset="mnist", output="logits", binary=False)
    tree = yaml.safe_load((gan / "config.yaml").read_text())
    tree["teacher"]["api_key"] = "sk-leaked"  # even a hand-edited key is not taken
    (gan / "config.yaml").write_text(yaml.safe_dump(tree))
    lines: list[str] = []
    cfg = load_config(None, None, ["teacher.output=probabilities"])
    assert inherit_provider(cfg, [tmp_path / "new", gan], lines.append) == {
        "url": "http://h:1/v2/models/t", "input_preset": "mnist", "binary": False}
    assert cfg.teacher.api_key is None and cfg.teacher.output == "probabilities" and len(lines) == 1
    local = load_config(None, None, ["teacher.checkpoint=t.pt"])  # a named checkpoint: no URL taken
    assert inherit_provider(local, [gan], lines.append) == {} and local.teacher.url is None
    resumed = stored("run", url="http://h:2/v2/models/t", input_preset="unit")  # its own run first
    cfg = load_config(None, None, [])
    assert inherit_provider(cfg, [resumed, gan], lines.append) == {  # binary: the run's own (true)
        "url": "http://h:2/v2/models/t", "input_preset": "unit"}
    (gan / "config.yaml").write_text(yaml.safe_dump({"teacher": {"input_preset": 7}}))
    with pytest.raises(ConfigError, match=r"gan/config.yaml: teacher.input_preset: "):
        inherit_provider(load_config(None, None, ["teacher.url=http://h:1"]), [gan])
    (gan / "config.yaml").write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cannot read .*gan/config.yaml \(\w+\); it records the teacher"):
        inherit_provider(load_config(None, None, []), [tmp_path / "new", gan])
