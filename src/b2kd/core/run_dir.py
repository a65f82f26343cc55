"""One run directory, one run: re-running into it with other settings is refused, never mixed.

``b2kd teacher train``, ``deprivatize`` and ``distill`` write into their ``--out`` the config
that made the run (``config.yaml``) and the SHA-256 of the checkpoints it read (``inputs.json``:
the teacher, the generator). Re-running the same command resumes: paid answers come from the
ledger, training from ``checkpoints/latest.pt``. Re-running with settings that change what the
run produces (another generator, method, response, lr, budget, pool, dataset, teacher ...) would
mix two runs in one directory: a pool paid under one budget trained under another, answers of
one teacher beside a student of another, a config.yaml describing a run it did not make. So
before anything is paid or written, :func:`check_same_run` compares the stored settings with
the new ones, by the rules :mod:`b2kd.core.config_diff` applies to bench cells too, and refuses with one
line naming the keys that differ.

Not compared: what does not change the product (threads, device, out, the network client's
waits and retries, where a cache lives, the torchrun section: :data:`b2kd.core.config_diff.IGNORED`),
the keys a stage never reads (a distillation does not read the GAN's epochs), and a teacher's URL
when both runs name a local copy of it (the copy's SHA-256 names the teacher; the demo serves it
on a new port each time). A key the stored config lacks is an option added to b2kd since.

A served teacher's settings (:data:`PROVIDER_KEYS`: its URL, input scaling, output form, wire
format) are stored with a run; a later command inherits the ones it is not given
(:func:`inherit_provider`): a resumed run from its own ``config.yaml``, a distillation from its
generator's run directory. The API key is never stored, so never inherited.

The rest of this module checks what a run needs before its first query (an ``--out`` that can be
written, a ledger SQLite can read) and leaves a refused run's directory as it found it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import yaml
from pydantic import ValidationError

from b2kd.core.config import Config, ConfigError, TeacherConfig, load_config, save_config
from b2kd.core.config_diff import differences, flatten

#: The teacher settings a stage that queries it depends on (not the ones that trained it).
QUERY_TEACHER = ("teacher.url", "teacher.input_name", "teacher.input_datatype", "teacher.input_shape",
                 "teacher.input_preset", "teacher.input_scale", "teacher.input_mean",
                 "teacher.input_std", "teacher.output", "teacher.embedding_output")
#: Per stage: the keys and sections ("data.") that decide what it produces.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "teacher": ("seed", "data.", "teacher."),
    "deprivatize": ("seed", "data.", *QUERY_TEACHER, "deprivatize."),
    "distill": ("seed", "data.", *QUERY_TEACHER, "distill."),
}
#: Per stage: keys inside those sections that change no product (read by reports, or by other stages).
STAGE_IGNORED: dict[str, frozenset[str]] = {
    "teacher": frozenset({"data.dev_size", "teacher.checkpoint", "teacher.url", "teacher.binary",
                          "teacher.allow_mixed_providers", *QUERY_TEACHER}),
    "deprivatize": frozenset({"data.dev_size"}),
    "distill": frozenset({"data.dev_size", "distill.thin_class_factor"}),
}
#: A served teacher's settings, stored with each run; later commands inherit those they are not given.
PROVIDER_KEYS = ("url", "input_name", "input_datatype", "input_shape", "input_preset", "input_scale",
                 "input_mean", "input_std", "output", "binary", "embedding_output")
INPUTS_FILE = "inputs.json"
MAX_LISTED = 4


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (checkpoints are written deterministically: same weights, same bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprints(inputs: dict[str, str | Path | None]) -> dict[str, dict[str, str]]:
    """{config key: {"path", "sha256"}} of the checkpoints a run reads (None: not read)."""
    return {key: {"path": str(path), "sha256": file_digest(path)}
            for key, path in inputs.items() if path is not None}


def _stored_tree(out: Path) -> dict | None:
    """OUT/config.yaml as a tree; None when there is none; one line when it cannot be read."""
    path = out / "config.yaml"
    if not path.exists():
        return None
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path} ({type(exc).__name__}); it records the run in {out}:"
                          " restore it, or choose another --out") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} is not a b2kd config; restore it, or choose another --out")
    return tree


def _stored_inputs(out: Path) -> dict:
    try:
        stored = json.loads((out / INPUTS_FILE).read_text())
    except (OSError, ValueError):
        return {}  # a run made before inputs were recorded: its config alone is compared
    return stored if isinstance(stored, dict) else {}


def _input_differences(stored: dict, now: dict[str, dict[str, str]]) -> list[str]:
    found = []
    for key, new in sorted(now.items()):
        old = stored.get(key)
        if isinstance(old, dict) and old.get("sha256") != new["sha256"]:
            change = (f"{old.get('path')} -> {new['path']}" if old.get("path") != new["path"]
                      else f"{new['path']} changed since")
            found.append(f"{key}: another file ({change})")
    return found


def _ignored(stage: str, cfg: Config, stored: dict) -> frozenset[str]:
    """The stage's ignored keys; and the teacher's URL when both runs name a local copy of it."""
    ignore = STAGE_IGNORED[stage]
    if cfg.teacher.checkpoint and flatten(stored).get("teacher.checkpoint"):
        ignore = ignore | {"teacher.url"}
    return ignore


def run_differences(cfg: Config, out: Path, stage: str,
                    inputs: dict[str, dict[str, str]] | None = None) -> list[str]:
    """'key: then -> now' for each setting or input of ``stage`` that differs from OUT's run."""
    stored = _stored_tree(out)
    if stored is None:
        return []
    found = differences(stored, cfg, STAGE_KEYS[stage], _ignored(stage, cfg, stored))
    return found + _input_differences(_stored_inputs(out), inputs or {})


def _stored_provider(run_dir: Path, own: bool) -> dict:
    """The provider settings DIR/config.yaml holds (checked as TeacherConfig checks them); {} if none.
    ``own``: DIR is this run's --out (an unreadable config is refused as check_same_run does)."""
    try:
        tree = _stored_tree(run_dir)
    except ConfigError as exc:
        if own:
            raise
        why = str(exc).split(";")[0]
        raise ConfigError(f"{why}; it records the teacher the run in {run_dir} queried: restore it,"
                          " or give the teacher's settings and move it away") from None
    stored = tree.get("teacher") if tree is not None else None
    if not isinstance(stored, dict):
        return {}
    found = {k: v for k, v in stored.items() if k in PROVIDER_KEYS}
    try:
        TeacherConfig.model_validate(found)
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise ConfigError(f"{run_dir / 'config.yaml'}: teacher.{'.'.join(map(str, problem['loc']))}:"
                          f" {problem['msg']}; restore it, or give the teacher's settings") from None
    return found


def inherit_provider(cfg: Config, sources: list[Path], log=print) -> dict[str, object]:
    """Give ``cfg.teacher`` the provider settings it was not given, from the runs in ``sources``
    (directories, this run's --out first; the first whose config.yaml holds a key decides it);
    one line says which.

    A setting given (on the command line, in --config, or set in code) is kept, whatever the
    runs hold: the ledger's provider check then decides whether answers may mix. ``teacher.url``
    is inherited only when no teacher is named at all (neither a URL nor a checkpoint), the other
    settings only when the run queries a served teacher. {key: value} of what was inherited."""
    teacher, given = cfg.teacher, cfg.teacher.model_fields_set
    decided: dict[str, tuple[object, Path]] = {}
    for i, source in enumerate(sources):
        for key, value in _stored_provider(source, own=i == 0).items():
            decided.setdefault(key, (value, source))
    now = teacher.model_dump(mode="json")
    taken: dict[str, tuple[object, Path]] = {}
    if "url" in decided and not {"url", "checkpoint"} & given and decided["url"][0] != now["url"]:
        taken["url"] = decided["url"]
    if teacher.url or "url" in taken:
        taken.update({k: found for k, found in decided.items()
                      if k != "url" and k not in given and found[0] != now[k]})
    for key, (value, _) in taken.items():
        setattr(teacher, key, value)
    if taken:
        by_source: dict[Path, list[str]] = {}
        for key, (value, source) in taken.items():
            by_source.setdefault(source, []).append(f"teacher.{key}={value}")
        log("provider settings not given, inherited: " + "; ".join(
            f"{', '.join(keys)} (from {source / 'config.yaml'})" for source, keys in by_source.items()))
    return {key: value for key, (value, _) in taken.items()}


def check_same_run(cfg: Config, out: Path, stage: str,
                   inputs: dict[str, dict[str, str]] | None = None) -> None:
    """One ConfigError when OUT holds a run of ``stage`` made with other settings, else nothing."""
    found = run_differences(cfg, out, stage, inputs)
    if not found:
        return
    more = f"; and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
    raise ConfigError(
        f"{out} holds a {stage} run made with other settings ({'; '.join(found[:MAX_LISTED])}{more});"
        " re-run with its settings to resume it, or choose another --out (nothing was paid or written)")


def record_run(cfg: Config, out: Path, inputs: dict[str, dict[str, str]] | None = None) -> None:
    """Create OUT and write config.yaml and inputs.json, unless a run already recorded them
    (a resumed run keeps the record of the run that made the directory)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.yaml").exists():
        tmp = out / ".config.yaml.tmp"
        save_config(cfg, tmp)
        tmp.replace(out / "config.yaml")
    if inputs and not (out / INPUTS_FILE).exists():
        (out / INPUTS_FILE).write_text(json.dumps(inputs, indent=2) + "\n")


def check_yaml(path: str | Path) -> None:
    """A malformed YAML file is one line naming the file, line and column (PyYAML's own message
    takes 5 to 8 lines, with a copy of the line and a caret)."""
    try:
        yaml.safe_load(Path(path).read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run directory was made with (a clear error when there is none)."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a b2kd run directory (no config.yaml)")
    check_yaml(run_dir / "config.yaml")
    return load_config(run_dir / "config.yaml")


def check_writable(out: Path) -> None:
    """``--out`` is a directory this process can write in, or one it can create: else one line.

    Nothing is created: the nearest existing folder is probed with an unnamed temporary file."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"cannot create --out {out}: {probe} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write in {probe} (for --out {out}): {exc.strerror or exc}") from None


def check_ledger(path: Path) -> None:
    """An existing ledger must pass SQLite's quick_check: a damaged one is one line, before any query."""
    if not path.exists():
        return
    problem = None
    try:
        with closing(sqlite3.connect(path, timeout=30)) as db:
            rows = db.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            problem = "; ".join(str(r[0]) for r in rows[:2])
    except sqlite3.Error as exc:
        problem = str(exc)
    if problem is not None:
        raise ConfigError(f"the ledger {path} is damaged ({problem}); nothing was sent: restore it"
                          " from a copy, or move it away to pay for its answers again")


def ledger_rows(path: Path) -> int:
    """Rows of a ledger: answers paid, and answers received and refused (a provider bills those
    too, so a run that met one made something); 0 when there is none or it has no table yet."""
    if not path.exists():
        return 0
    rows = 0
    try:
        with closing(sqlite3.connect(path, timeout=30)) as db:
            for table in ("queries", "refused"):
                try:
                    rows += int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                except sqlite3.Error:
                    pass  # not there yet (a ledger older than the table, or not a ledger)
    except sqlite3.Error:
        return 0
    return rows


class Attempt:
    """What one run adds to its directory, so a run that stops before it has paid or trained
    anything leaves no config.yaml, ledger or pool behind (they would describe a run never made)."""

    def __init__(self, out: Path):
        self.out = out
        self.top = out  # the highest folder this run would create (out, or one above it)
        while not self.top.parent.exists() and self.top.parent != self.top:
            self.top = self.top.parent
        self.before = set(os.listdir(out)) if out.is_dir() else None
        self.rows = ledger_rows(out / "ledger.sqlite")
        self.checkpoints = self._checkpoints()

    def _checkpoints(self) -> dict[str, int]:
        folder = self.out / "checkpoints"
        return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.is_dir() else {}

    def made_something(self) -> bool:
        """Whether the run paid a query or wrote a checkpoint (then everything it wrote stays)."""
        return ledger_rows(self.out / "ledger.sqlite") != self.rows or self._checkpoints() != self.checkpoints

    def undo(self) -> None:
        """Remove what the run created; what was there before it is left as it was."""
        if self.before is None:
            shutil.rmtree(self.top, ignore_errors=True)
            return
        for name in set(os.listdir(self.out)) - self.before:
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextmanager
def nothing_left_if_refused(out: Path, writes: bool = True) -> Iterator[None]:
    """Run the body; if it fails before paying a query or writing a checkpoint, undo what it wrote."""
    attempt = Attempt(out) if writes else None
    try:
        yield
    except Exception:
        if attempt is not None and not attempt.made_something():
            attempt.undo()
        raise
