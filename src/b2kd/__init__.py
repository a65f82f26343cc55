"""b2kd: black-box knowledge distillation from the cloud to the edge.

The package follows the pipeline: ``b2kd.core`` (config, run directories, checkpoints), ``data``,
``models``, ``blackbox``, ``edge``, ``provider``, ``teacher``, ``deprivatize``, ``pool``, ``distill``,
``evaluate``, ``deploy`` and ``bench``, with ``b2kd.cli``, ``b2kd.pipeline`` and ``b2kd.demo`` on top.
The entry points below are importable from ``b2kd`` itself; each is loaded on first use, so
``import b2kd`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.3.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "Config": "b2kd.core.config",
    "ConfigError": "b2kd.core.config",
    "load_config": "b2kd.core.config",
    "run_teacher": "b2kd.pipeline",
    "run_deprivatize": "b2kd.pipeline",
    "run_distill": "b2kd.pipeline",
    "run_evaluate": "b2kd.pipeline",
    "run_demo": "b2kd.demo",
    "build_model": "b2kd.models",
    "load_classifier": "b2kd.models",
    "load_generator": "b2kd.models",
    "serve": "b2kd.provider.serve",
    "ServedTeacher": "b2kd.provider.serve",
    "audit_run": "b2kd.evaluate.audit",
    "export_run": "b2kd.deploy.export",
    "predict_files": "b2kd.deploy.predict",
    "adapt_run": "b2kd.deploy.adapt",
    "run_bench": "b2kd.bench.run",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'b2kd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
