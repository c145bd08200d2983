"""Reading config files: YAML, ``_base_`` chains, ``--set`` overrides, and typed dataclasses
built from the merged tree.

Unknown keys and values of the wrong type are refused with a message naming the dotted key,
before any work starts. ``--set a.b=value`` overrides parse ``value`` as YAML (so
``--set optim.lr=0.3`` is a float).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from train.config_fields import ConfigError

NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` coerced to ``annotation`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple and typing.get_args(annotation)[-1] is Ellipsis:  # a list of any length
        item = typing.get_args(annotation)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if dataclasses.is_dataclass(item):
            return tuple(build_dataclass(item, v, f"{key}[{i}].") for i, v in enumerate(value))
        return tuple(_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; every user means the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from a tree of plain values, each checked against its type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(prefix + key + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        raise ConfigError(f"unknown config key(s): {', '.join(hints)}; known in {prefix.rstrip('.') or 'the top level'}: "
                          f"{', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = build_dataclass(annotation, value, key + ".")
        else:
            kwargs[name] = _check_type(key, value, annotation)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # dataclass __post_init__ checks (e.g. the recipe)
        raise ConfigError(str(exc)) from exc


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def merge_trees(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


BASE_KEY = "_base_"  # a config file may name another file whose values it overrides


def shipped_configs() -> list[str]:
    """The names of the configs shipped with the package (``configs/*.yaml``)."""
    try:
        folder = importlib.resources.files("configs")
    except ModuleNotFoundError:  # not installed with its configs
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))


def _shipped(name: str) -> Path | None:
    """The shipped config called ``name`` or ``name.yaml``, if any."""
    names = shipped_configs()
    for candidate in (name, f"{name}.yaml"):
        if candidate in names:
            return Path(str(importlib.resources.files("configs").joinpath(candidate)))
    return None


def _not_found(what: str, path: Path) -> ConfigError:
    """``<what> not found: <path>``, the nearest shipped config's name and the list of them."""
    names = [n[: -len(".yaml")] for n in shipped_configs()]
    close = difflib.get_close_matches(path.name.removesuffix(".yaml"), names, n=1)
    return ConfigError(f"{what} not found: {path}" + (f" (did you mean {close[0]}?)" if close else "")
                       + (f"; shipped configs: {', '.join(names)}" if names else ""))


def find_config(path: str | Path) -> Path:
    """``path`` as given, or, when it does not exist, the config of that name shipped with
    the package (``configs/``), so that ``--config configs/demo.yaml``, ``--config demo.yaml``
    or ``--config demo`` works from an installed package too."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = _shipped(path.name) if path.parent in (Path("."), Path("configs")) else None
    if shipped is None:
        raise _not_found("config file", path)
    return shipped


def find_base(base: str, including: Path) -> Path:
    """The ``_base_`` file that config ``including`` names: a path relative to ``including``'s
    folder (or absolute; ``.yaml`` optional) when that file exists, else, for a bare name, the shipped config of
    that name (``.yaml`` optional), so that a config in any folder can build on a shipped one."""
    beside = Path(base) if Path(base).is_absolute() else including.parent / base
    for candidate in (beside, beside.with_name(beside.name + ".yaml")):
        if candidate.is_file():
            return candidate
    shipped = _shipped(base) if Path(base).parent == Path(".") else None
    if shipped is None:
        raise _not_found(f"config {including}: {BASE_KEY} {base!r}", beside)
    return shipped


def read_config_tree(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """The values of config file ``path`` merged over those of its ``_base_`` file(s), recursively
    (``find_base``: beside the file that names it, else a shipped config)."""
    path = path if seen else find_config(path)
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: _base_ files form a cycle: {' -> '.join(str(p) for p in seen)}")
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(tree).__name__}")
    base = tree.pop(BASE_KEY, None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: {BASE_KEY} must be a file name, got {base!r}")
    return merge_trees(read_config_tree(find_base(base, path), seen + (path.resolve(),)), tree)


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON dumps and checkpoints."""

    def convert(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple):
            return [convert(v) for v in obj]
        return obj

    return convert(cfg)
