"""The config reference (``docs/CONFIG.md``), generated from the dataclasses: every key with its
type, default, allowed values and one line of meaning, read from each field's ``setting``.

    python -m train.config_reference > docs/CONFIG.md

``tests/test_config_reference.py`` regenerates it and compares, so the file stays current.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import re
import sys
import typing

from pipelines.augment.recipe import RECIPE_FIELDS, ViewGroupSpec
from pipelines.settings import Limits, field_doc, field_limits
from train.config import PretrainConfig, shipped_configs

HEADER = """# Config reference

Generated from the config dataclasses by `python -m train.config_reference > docs/CONFIG.md`
(a test regenerates it and compares); do not edit by hand. Each key's meaning is written beside
its field (`train/config_sections.py`, `train/config_loss.py`, `pipelines/augment/recipe.py`).

A config is a YAML file of these sections. A file may start with `_base_: other.yaml`, whose
values it overrides (found beside the file first, then among the shipped configs by name);
`--set section.key=value` overrides any key (the value is read as YAML); `--print-config` prints
the resolved config and exits. Every value is checked when the config loads, naming the key:
types, the allowed values below (numbers finite), then what keys ask of each other (the support
set, the view groups, the warm-up, the encoder's input size) before the run starts.
"""


def type_name(annotation: typing.Any) -> str:
    """``int``, ``float or null``, ``[float, float]``, ``list of string`` ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and type(None) in args):
        return " or ".join(type_name(a) if a is not type(None) else "null" for a in args)
    if origin is tuple and args[-1] is Ellipsis:
        return "list of groups" if dataclasses.is_dataclass(args[0]) else f"list of {type_name(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if dataclasses.is_dataclass(annotation):
        return "section"
    return {str: "string", bool: "true/false"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def value_text(value: typing.Any) -> str:
    """A default as YAML writes it: ``null``, ``true``, ``[0.08, 1]``, ``""``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if value == "":
        return '""'
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def section_rows(cls: type, instance: typing.Any, prefix: str) -> list[str]:
    """One table row per field of ``cls``; sub-sections and view groups get tables of their own."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            continue
        doc = field_doc(f)
        if not doc and cls is ViewGroupSpec and f.name in RECIPE_FIELDS:
            doc = "this group's value; null: the section's"
        limits = field_limits(f)
        allowed = limits.describe() if limits != Limits() else ""
        if cls is ViewGroupSpec and f.name in RECIPE_FIELDS:
            allowed = f"as augment.{f.name}"
        rows.append(f"| `{prefix}{f.name}` | {type_name(hints[f.name])} | `{value_text(value)}` | "
                    f"{_cell(allowed)} | {_cell(doc)} |")
    return rows


def section_table(title: str, cls: type, instance: typing.Any, prefix: str, intro: str = "") -> list[str]:
    lines = [f"## {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    return lines + section_rows(cls, instance, prefix) + [""]


def sections(cfg: PretrainConfig) -> list[str]:
    """Every section's table, in the order of ``PretrainConfig``, sub-sections after their parent."""
    lines = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        intro = _first_line(type(section)) or field_doc(f)
        lines += section_table(f"`{f.name}`", type(section), section, f"{f.name}.", intro)
        for sub in dataclasses.fields(section):
            value = getattr(section, sub.name)
            if dataclasses.is_dataclass(value):
                lines += section_table(f"`{f.name}.{sub.name}`", type(value), value, f"{f.name}.{sub.name}.",
                                       field_doc(sub))
        if f.name == "augment":
            lines += section_table("`augment.views[i]`", ViewGroupSpec, ViewGroupSpec(), "",
                                   "One view group of `augment.views` (multi-crop), e.g. "
                                   "`[{count: 2}, {count: 6, resolution: 96, crop_scale: [0.05, 0.14]}]`; the "
                                   "first group holds the views the losses pair (count >= 2), at most 64 views "
                                   "per image in all.")
    return lines


def _first_line(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    if doc.startswith(cls.__name__ + "("):  # the dataclass's generated signature: no docstring
        return ""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "`")


def shipped_table() -> list[str]:
    """The shipped configs and the first line of each one's header comment."""
    folder = importlib.resources.files("configs")
    lines = ["## Shipped configs", "", "`--config NAME` finds these by name, from any folder.", "",
             "| config | what |", "|---|---|"]
    for name in shipped_configs():
        lines.append(f"| `{name}` | {_cell(first_sentence(folder.joinpath(name).read_text()))} |")
    return lines + [""]


def first_sentence(text: str) -> str:
    """The first sentence of a config file's opening comment."""
    comment = " ".join(itertools.takewhile(lambda line: line.startswith("#"), text.splitlines()))
    comment = " ".join(comment.replace("#", " ").split())
    return re.split(r"(?<=\.)\s+(?=[A-Z])", comment, maxsplit=1)[0]


def reference() -> str:
    return "\n".join([HEADER, *shipped_table(), *sections(PretrainConfig())]).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
