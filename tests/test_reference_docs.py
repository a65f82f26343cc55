"""docs/reference/ is generated (b2kd.reference_docs): the committed pages are what the config models
and the CLI say now, every key has a description, and every option names a key that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from b2kd import reference_docs
from b2kd.core.config import REMOVED, Config

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"


@pytest.mark.parametrize("name", reference_docs.PAGES)
def test_committed_reference_pages_are_up_to_date(name):
    committed = (REFERENCE / name).read_text(encoding="utf-8") if (REFERENCE / name).is_file() else ""
    assert committed == reference_docs.pages()[name], (
        f"docs/reference/{name} is out of date with src/b2kd/core/config.py and src/b2kd/cli.py:"
        " run `python -m b2kd.reference_docs` and commit the result")


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        if isinstance(field.default, BaseModel):
            yield from _fields(type(field.default), f"{name}.")


def test_every_config_key_has_a_short_description():
    missing = [key for key, field in _fields(Config) if not field.description]
    assert not missing, f"keys without Field(description=...): {missing}"
    long = [key for key, field in _fields(Config) if len(field.description) > 200]
    assert not long, f"descriptions over 200 characters (the page is a table): {long}"


def test_every_key_and_every_removed_key_is_documented():
    page = reference_docs.config_page()
    for key, _ in _fields(Config):
        if "." in key or not isinstance(getattr(Config(), key), BaseModel):
            assert f"| `{key}` |" in page, key
    for key in REMOVED:
        assert f"| `{key}` |" in page, key
        assert key not in reference_docs._config_keys()


def test_every_option_names_a_key_that_exists():
    """An option's help ends with the key it sets, [section.key]: a renamed or removed key shows."""
    from typer.main import get_command

    from b2kd.cli import app

    root = get_command(app)
    ctx = type(root).context_class(root, info_name="b2kd")
    named = []
    for _, command, sub in reference_docs._commands(root, ctx, []):
        for param in command.params:
            record = param.get_help_record(sub)
            named += re.findall(r"\[([a-z_]+\.[a-z_]+)\]", record[1] if record else "")
    assert named, "no option names a config key"
    stale = sorted(set(named) - reference_docs._config_keys())
    assert not stale, f"options name keys the config does not have: {stale}"


def test_the_generator_writes_both_pages(tmp_path):
    reference_docs.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(reference_docs.PAGES)
    assert (tmp_path / "config.md").read_text(encoding="utf-8") == reference_docs.config_page()
