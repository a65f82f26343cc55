"""Which settings of a stored config differ from the current one, by the rules every reuse check applies.

A run directory re-run with other settings (:mod:`b2kd.core.run_dir`) and a bench directory
reused by a changed bench file (:mod:`b2kd.bench.reuse`) are both refused with the keys this
module names. Not compared: :data:`IGNORED` (paths, threads, device, the network client's waits)
and :data:`IGNORED_SECTIONS`; a stored option b2kd no longer has
(:data:`b2kd.core.config.REMOVED`) is a difference when it was set to something else than what
b2kd kept.
"""

from __future__ import annotations

from typing import Any

from b2kd.core.config import ANY, REMOVED, Config

IGNORED = {
    "threads", "device", "out", "teacher.shared_cache", "deprivatize.generator",
    "teacher.timeout_s", "teacher.retries", "teacher.backoff_s", "teacher.max_wait_s",
    "teacher.max_total_wait_s",
}
IGNORED_SECTIONS = ("serve.", "distributed.", "adapt.")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _compared(flat: dict[str, Any], keys: tuple[str, ...] | None,
              ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {k: v for k, v in flat.items()
            if k not in IGNORED and k not in ignore and not k.startswith(IGNORED_SECTIONS)
            and (keys is None or any(k == p or (p.endswith(".") and k.startswith(p)) for p in keys))}


def differences(stored: dict, now: Config, keys: tuple[str, ...] | None = None,
                ignore: frozenset[str] = frozenset()) -> list[str]:
    """'key: then -> now' for each compared setting that differs (stored: a config.yaml tree).

    ``keys``: only these keys and sections ('data.'); ``ignore``: keys not compared beside IGNORED
    (b2kd.core.run_dir compares a CLI run's directory with these rules, per stage)."""
    then = _compared(flatten(stored), keys, ignore)
    current = _compared(flatten(now.model_dump(mode="json")), keys, ignore)
    gone = [f"{k}: {then[k]!r} -> removed, always {REMOVED[k]!r}" for k in sorted(then)
            if k in REMOVED and REMOVED[k] is not ANY and then[k] != REMOVED[k]]
    return gone + [f"{k}: {then[k]!r} -> {current[k]!r}" for k in sorted(current)
                   if k in then and then[k] != current[k]]
