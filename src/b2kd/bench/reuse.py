"""Whether a bench directory's earlier work may be reused by the bench file as it is now.

`b2kd bench` reads a finished cell back, resumes an unfinished one and shares one GAN
per gap and seed (:mod:`b2kd.bench.run`). Each of those directories holds the config that
made it (``config.yaml``). If the bench file changed since (another GAN schedule,
another learning rate), reusing them would mix old results into the new table without
a word. So before anything runs, every such directory's settings are compared with the
ones the bench would use now, and any difference is one clear error naming the
directory and the settings: nothing is deleted (paid answers stay in their ledgers).
The comparison is :func:`b2kd.core.config_diff.differences`, the one a CLI run's directory gets.

Not compared (:data:`b2kd.core.config_diff.IGNORED`): paths that only say where things live
(the shared cache, the generator file, the run's ``out``), the thread count and device, the network client's waits and
retries, and the sections a bench cell never reads (serve, distributed, adapt). A key
missing from the stored config is an option added to b2kd since that run: not a
difference (new options default to the old behaviour). A stored option b2kd no longer has
(:data:`b2kd.core.config.REMOVED`) is one when it was set to something else than what b2kd kept.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from b2kd.core.config import Config, ConfigError
from b2kd.core.config_diff import differences

# what shapes a shared GAN (the cell's own distill settings do not)
GAN_KEYS = ("seed", "data.", "deprivatize.", "teacher.")
# what shapes a teacher trained into OUT/teacher
TEACHER_KEYS = ("seed", "data.", "teacher.")


def stored_config(run_dir: Path) -> dict | None:
    """The config.yaml a run directory was made with (None if it has none or it is unreadable)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return tree if isinstance(tree, dict) else None


def mismatch(run_dir: Path, now: Config, keys: tuple[str, ...] | None = None) -> str | None:
    """A one-line reason not to reuse ``run_dir`` with ``now``, or None when it may be reused."""
    stored = stored_config(run_dir)
    if stored is None:
        return None
    diff = differences(stored, now, keys)
    if not diff:
        return None
    more = f"; and {len(diff) - 3} more" if len(diff) > 3 else ""
    return f"{run_dir} ({'; '.join(diff[:3])}{more})"


def check_reuse(problems: list[str | None]) -> None:
    """One ConfigError for every directory that may not be reused, or nothing."""
    found = [p for p in problems if p]
    if not found:
        return
    listed = "\n  ".join(found[:5]) + (f"\n  ... and {len(found) - 5} more" if len(found) > 5 else "")
    raise ConfigError(
        f"{len(found)} director{'y' if len(found) == 1 else 'ies'} in this bench's OUT "
        f"{'was' if len(found) == 1 else 'were'} made with other settings than the bench file now gives:\n  "
        f"{listed}\nRemove {'it' if len(found) == 1 else 'them'} (their results would be stale) or bench into "
        "another --out; the shared ledgers keep every paid answer either way."
    )
