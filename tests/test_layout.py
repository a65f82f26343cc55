"""The package's layout shows the pipeline: a thin top (cli, pipeline, demo) over one subpackage per
stage, each importing only from the stages before it, in functions short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "b2kd"

#: The stages, first to last: a module may import from its own stage and the ones before it.
STAGES = ("core", "data", "models", "blackbox", "edge", "provider", "teacher", "deprivatize", "pool",
          "distill", "evaluate", "deploy", "bench", "top")
#: What the package root holds besides the stages' subpackages: the orchestration on top.
ROOT_FILES = {"__init__.py", "__main__.py", "cli.py", "pipeline.py", "demo.py", "reference_docs.py",
              "py.typed"}
#: Imports from a later stage that are the design, each with its reason.
EXCEPTIONS = {
    ("b2kd.bench.run", "b2kd.pipeline"): "a bench cell is a pipeline run: bench sits on the stages it runs",
    ("b2kd.bench.on_ray", "b2kd.pipeline"): "the same cells as Ray tasks: each runs the pipeline's stages",
}
MAX_FUNCTION_LINES = 80
LAZY = "<re-exported>"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("b2kd", *path.relative_to(SRC).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def stage_of(module: str) -> str:
    parts = module.split(".")
    if module == "b2kd":  # the package root itself: what it defines (the version) comes first
        return STAGES[0]
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else "top"


def _imported(module: str, path: Path) -> set[str]:
    """Every b2kd module ``module`` imports, at module level or inside a function."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "b2kd"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "b2kd":
                continue
            for alias in node.names:  # `from b2kd.core import distributed` imports a module
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    found.add(sub)
                elif base != "b2kd" or alias.name == "__version__":
                    found.add(base)
                else:  # one of the names b2kd re-exports from its stages: the top's
                    found.add(f"b2kd.{LAZY}")
    return found


def _edges() -> list[tuple[str, str]]:
    return [(m, target) for m, path in MODULES.items() for target in sorted(_imported(m, path))]


def test_the_package_root_holds_only_the_top_and_the_stages():
    entries = {p.name for p in SRC.iterdir() if p.name != "__pycache__"}
    unexpected = entries - ROOT_FILES - set(STAGES)
    assert not unexpected, f"src/b2kd/ holds {sorted(unexpected)}: put each module in its stage's subpackage"
    missing = [s for s in STAGES[:-1] if not (SRC / s / "__init__.py").is_file()]
    assert not missing, f"stages without a subpackage: {missing}"


def test_no_module_imports_from_a_later_stage():
    later = []
    for module, target in _edges():
        if STAGES.index(stage_of(target)) > STAGES.index(stage_of(module)) and (module, target) not in EXCEPTIONS:
            later.append(f"{module} ({stage_of(module)}) imports {target} ({stage_of(target)})")
    assert not later, "a stage imports one that comes after it:\n  " + "\n  ".join(later)


def test_every_listed_exception_is_still_an_import():
    edges = set(_edges())
    stale = [pair for pair in EXCEPTIONS if pair not in edges]
    assert not stale, f"exceptions no longer needed (remove them): {stale}"


def test_no_modules_import_each_other():
    """No import cycle, direct or through other modules (lazy imports inside functions included)."""
    graph: dict[str, set[str]] = {}
    for module, target in _edges():
        if target != module and target in MODULES:
            graph.setdefault(module, set()).add(target)
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for target in sorted(graph.get(module, ())):
            cycle = visit(target, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_stages_are_listed_in_order_and_cover_the_package():
    assert {stage_of(m) for m in MODULES} <= set(STAGES)
    assert len(STAGES) == len(set(STAGES))


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_function_is_longer_than_80_lines(path):
    long = [f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"split into named steps: {long}"


def test_the_public_entry_points_are_importable_from_b2kd():
    import b2kd

    missing = [name for name in b2kd.__all__ if getattr(b2kd, name, None) is None]
    assert not missing, f"b2kd.__all__ names what b2kd cannot give: {missing}"
