"""The documentation: the site builds cleanly, pages stay short, and no internal vocabulary leaks.

A reader of the docs, the configs or the code never needs the project's internal progress
labels (the numbered work items and milestones it was built in); results are dated by day and
commit instead. These tests keep it that way.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

README_MAX_LINES = 160
DOC_MAX_LINES = 320

# internal progress words: a numbered work item or milestone, in prose or in a file name
INTERNAL = [
    re.compile(r"\bstops? \d+", re.IGNORECASE),
    re.compile(r"\bstop-\d+", re.IGNORECASE),
    re.compile(r"\bissues? ?[-#]?\d+", re.IGNORECASE),
    re.compile(r"\bthis stop\b", re.IGNORECASE),
    re.compile(r"[-_/]stop\d+", re.IGNORECASE),
]


def _doc_pages() -> list[Path]:
    return sorted((ROOT / "docs").rglob("*.md"))


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed")
def test_mkdocs_builds_strict(tmp_path):
    """Every page in the nav, every link and every anchor resolves (warnings are errors)."""
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "index.html").is_file()


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def test_doc_pages_are_short():
    long = {str(p.relative_to(ROOT)): n for p in _doc_pages()
            if (n := p.read_text(encoding="utf-8").count("\n")) > DOC_MAX_LINES}
    assert not long, f"pages over {DOC_MAX_LINES} lines: {long}"


def test_readme_links_stay_inside_the_repository():
    """A link that leaves the checkout (../something) is broken in every other clone."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    outside = re.findall(r"\]\((\.\./[^)]*)\)|`(\.\./[^`]*)`", text)
    assert not outside, f"README.md links outside the repository: {outside}"
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), f"README.md links to a missing file: {target}"


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode("utf-8", "replace").split("\0") if name]


def _text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None  # deleted in the work tree, or a submodule
    if b"\0" in data[:8192]:
        return None  # binary (images, checkpoints)
    return data.decode("utf-8", "replace")


def test_no_internal_progress_words():
    offenders = []
    for path in _tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if any(p.search(rel) for p in INTERNAL):
            offenders.append(f"{rel}: file name")
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in INTERNAL):
                offenders.append(f"{rel}:{number}: {line.strip()[:100]}")
    assert not offenders, "internal progress words:\n" + "\n".join(offenders)
