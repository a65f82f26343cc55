"""The reference pages, generated: every config key from the pydantic models, every command from the CLI.

``python -m b2kd.reference_docs`` writes ``docs/reference/config.md`` (each section's keys with
their type, bounds, default and ``Field(description=...)``) and ``docs/reference/cli.md`` (each
``b2kd`` command's help, usage and options, read from the Typer app through its click
commands). ``tests/test_reference_docs.py`` regenerates both in memory and fails when the
committed pages differ, so a new key or option is documented the moment it exists.
"""

from __future__ import annotations

import argparse
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from b2kd.core.config import ANY, REMOVED, Config

PAGES = ("config.md", "cli.md")
_REGENERATE = "`python -m b2kd.reference_docs`"


def _cell(text: str) -> str:
    """Table-cell safe: no pipe, no line break."""
    return " ".join(str(text).replace("|", "/").split())


def _value(value: Any) -> str:
    """A default as it is written in YAML."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [_type(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in args else "")
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return f"list of {_type(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type(a) for a in args) + "]"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _bounds(metadata: list) -> str:
    found = []
    for item in metadata:
        for attr, sign in _BOUNDS:
            if getattr(item, attr, None) is not None:
                found.append(f"{sign} {getattr(item, attr)}")
    return " and ".join(found)


def _section_table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if isinstance(field.default, BaseModel):
            continue  # a section: its own table below
        kind = _type(field.annotation)
        bounds = _bounds(field.metadata)
        if bounds:
            kind += f", {bounds}"
        rows.append(f"| `{prefix}{name}` | {_cell(kind)} | `{_cell(_value(field.default))}` "
                    f"| {_cell(field.description or '')} |")
    return rows


def _doc(model: type[BaseModel]) -> str:
    """A section model's own docstring, first paragraph."""
    text = (model.__dict__.get("__doc__") or "").strip()
    return " ".join(text.split("\n\n")[0].split()).replace("``", "`")


def config_page() -> str:
    lines = [
        "# Configuration reference",
        "",
        f"Generated from the pydantic models in `src/b2kd/core/config.py` by {_REGENERATE}; do not edit "
        "it by hand.",
        "",
        "Settings apply in this order: the defaults below, the YAML file (`--config`), the command's "
        "options, then `section.key=value` arguments, whose value is read as YAML "
        "(`distill.milestones=[10,20]`). The defaults are MEKD's recipe, the settings that measured "
        "best on the dev split; `configs/demo.yaml` only sizes a run for a CPU. Every run directory "
        "holds its resolved `config.yaml`.",
        "",
        "## Top level",
        "",
        *_section_table(Config, ""),
    ]
    for name, field in Config.model_fields.items():
        if not isinstance(field.default, BaseModel):
            continue
        model = type(field.default)
        lines += ["", f"## {name}", ""]
        about = _doc(model) or field.description or ""
        if about:
            lines += [about if about.endswith(".") else about + ".", ""]
        lines += _section_table(model, f"{name}.")
    lines += [
        "",
        "## Removed options",
        "",
        "These options measured no better on the dev split and were removed. An older run's "
        "`config.yaml` that names them still loads: a setting equal to the behaviour kept is "
        "dropped, any other is dropped with one warning line; asking for another value on the "
        "command line is an error.",
        "",
        "| key | b2kd now always runs as |",
        "|---|---|",
        *(f"| `{key}` | {'(no effect)' if kept is ANY else f'`{_cell(_value(kept))}`'} |"
          for key, kept in REMOVED.items()),
    ]
    return "\n".join(lines) + "\n"


_KEY = re.compile(r"\s*\[([a-z_]+(?:\.[a-z_]+)?)\]")


def _config_keys() -> set[str]:
    """Every key of the configuration, dotted."""
    keys = set()
    for name, field in Config.model_fields.items():
        if isinstance(field.default, BaseModel):
            keys |= {f"{name}.{key}" for key in type(field.default).model_fields}
        else:
            keys.add(name)
    return keys


def _option_row(param, ctx) -> str:
    record = param.get_help_record(ctx)
    if record is None:  # hidden
        return ""
    names, help_text = record
    value = ""
    if " <" in names:  # '--out <str>': the value's kind after the names
        names, value = names.split(" <", 1)
        value = value.rstrip(">")
    names = ", ".join(f"`{n.strip()}`" for n in names.split(","))
    known = _config_keys()
    keys = [k for k in _KEY.findall(help_text) if k in known]
    help_text = _KEY.sub(lambda m: "" if m.group(1) in known else f" ({m.group(1)})", help_text).strip()
    sets = ", ".join(f"`{k}`" for k in keys)
    return f"| {names} | {_cell(value)} | {sets} | {_cell(help_text)} |"


def _commands(group, ctx, path: list[str]):
    """(path, command, context) of every leaf command, in the app's order."""
    for name, command in group.commands.items():
        if getattr(command, "hidden", False):
            continue
        sub = type(command).context_class(command, info_name=name, parent=ctx)
        if hasattr(command, "commands"):
            yield from _commands(command, sub, [*path, name])
        else:
            yield [*path, name], command, sub


def cli_page() -> str:
    from typer.main import get_command

    from b2kd.cli import app

    root = get_command(app)
    ctx = type(root).context_class(root, info_name="b2kd")
    lines = [
        "# Command-line reference",
        "",
        f"Generated from the `b2kd` command's own help by {_REGENERATE}; do not edit it by hand.",
        "",
        "Every option sets the [configuration key](config.md) named beside it, and trailing "
        "`section.key=value` arguments override any key.",
    ]
    for path, command, sub in _commands(root, ctx, []):
        # from its pieces: click's own usage line wraps at the terminal's width
        usage = " ".join(["b2kd", *path, *command.collect_usage_pieces(sub)])
        lines += ["", f"## b2kd {' '.join(path)}", "", " ".join((command.help or "").split()), "",
                  f"`{usage}`", "", "| option | value | sets | help |", "|---|---|---|---|"]
        lines += [row for p in command.params if (row := _option_row(p, sub))]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """Every reference page, by file name."""
    return {"config.md": config_page(), "cli.md": cli_page()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    checkout = Path(__file__).resolve().parents[2]
    parser.add_argument("--out", type=Path, default=checkout / "docs" / "reference",
                        help="the folder written (default: the checkout's docs/reference)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
