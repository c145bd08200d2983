"""What an exported encoder needs besides its tensors (``EncoderInfo``), and reading it back safely.

An export's sidecar ``<file>.json`` (and a ``.safetensors`` file's metadata) may come from
anywhere: a downloaded file is input, not trust. ``parse_info`` checks it as the config is
checked (known fields, types, allowed values and ranges, finite numbers) and refuses anything
else in one line naming the field and the file, so that a tampered sidecar can neither crash a
tool nor make it allocate absurd buffers or evaluate a silently broken encoder. The one path a
sidecar holds, ``labeled_list``, is never read from where it points: ``train.eval_inputs``
looks for it inside the data folder the user names.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchvision.transforms import v2

from model import check_arch
from pipelines.augment.recipe import SimCLRRecipe
from pipelines.augment.reference import eval_transform
from train.config import PretrainConfig, config_from_dict
from train.objectives import METHODS

MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024  # image sides an export is evaluated at (8: the config's least)
SAFETENSORS_HINT = "pip install safetensors"


class ExportError(RuntimeError):
    """The encoder cannot be written or read in the format asked for; the message says why."""


@dataclass(frozen=True)
class EncoderInfo:
    """What an exported encoder needs besides its tensors to be used as it was trained."""

    arch: str
    resolution: int  # the first view group's side at the end of training: what evaluation resizes to
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    method: str = "simclr"
    labeled_list: str | None = None  # the run's labeled subset: its list, or its stratified draw
    labeled_fraction: float = 0.1
    seed: int = 0
    checkpoint: str | None = None
    global_step: int | None = None
    # (first global step, side) of each stretch of training at one side, oldest first, when the
    # checkpoint recorded its history: several when a resume changed the side; empty when unknown
    trained_resolutions: tuple[tuple[int, int], ...] = ()
    classes: tuple[str, ...] | None = None  # a fine-tuned model's class names, in the order of its logits

    @classmethod
    def of(cls, cfg: PretrainConfig, checkpoint: str | Path | None = None, step: int | None = None,
           history: list | None = None) -> EncoderInfo:
        """``cfg``'s encoder; ``history`` is a checkpoint's ``config_history`` (``train.export``), if any."""
        recipe = cfg.eval_recipe
        return cls(cfg.model.arch, recipe.resolution, tuple(recipe.mean), tuple(recipe.std), cfg.loss.method,
                   cfg.data.labeled_list, cfg.data.labeled_fraction, cfg.run.seed,
                   None if checkpoint is None else str(checkpoint), step, stretches_of(history))

    def apply(self, cfg: PretrainConfig) -> PretrainConfig:
        """``cfg`` with this encoder's arch, image settings and labeled-subset rule."""
        return dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, arch=self.arch),
            augment=dataclasses.replace(cfg.augment, resolution=self.resolution, mean=tuple(self.mean),
                                        std=tuple(self.std), views=()),
            data=dataclasses.replace(cfg.data, labeled_list=self.labeled_list,
                                     labeled_fraction=self.labeled_fraction),
            run=dataclasses.replace(cfg.run, seed=self.seed))

    def transform(self) -> v2.Compose:
        """PIL image (or uint8 tensor) to the normalised tensor the encoder expects, as
        ``train.evaluate`` prepares it: short side to ``resolution / 0.875``, centre crop, normalise."""
        return eval_transform(SimCLRRecipe(resolution=self.resolution, mean=self.mean, std=self.std))

    def resolution_note(self, source: str | Path) -> str | None:
        """A note when the run trained at several image sides (a resume changed it), else None."""
        sides = {side for _, side in self.trained_resolutions}
        if len(sides) < 2:
            return None
        ends = [start for start, _ in self.trained_resolutions[1:]] + [self.global_step]
        parts = [f"{side} px from step {start}" + (f" to {end}" if end is not None else "")
                 for (start, side), end in zip(self.trained_resolutions, ends)]
        return (f"note: {source} was trained at several image sides ({'; '.join(parts)}: a resume changed "
                f"augment.resolution); evaluating at {self.resolution} px, the last (an export evaluates at "
                "another with --resolution)")


def stretches_of(history: list | None) -> tuple[tuple[int, int], ...]:
    """(first global step, evaluation side) of each stretch of a checkpoint's ``config_history``
    (a list of ``{"global_step", "config"}``, one per start or resume), merging equal neighbours."""
    stretches: list[tuple[int, int]] = []
    try:
        for entry in history or ():
            side = config_from_dict(entry["config"]).eval_recipe.resolution
            if not stretches or stretches[-1][1] != side:
                stretches.append((int(entry["global_step"]), side))
    except (KeyError, TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise ExportError(f"the checkpoint's config history is not what this version reads ({exc})") from None
    return tuple(stretches)


def sidecar(path: str | Path) -> Path:
    return Path(f"{path}.json")


def read_info(path: str | Path) -> EncoderInfo | None:
    """The checked ``EncoderInfo`` of an export (its sidecar, or a ``.safetensors`` file's
    metadata), None when it has neither; ``ExportError`` naming the field for a bad one."""
    path = Path(path)
    if sidecar(path).is_file():
        source, text = sidecar(path), _read_text(sidecar(path))
    else:
        source, text = path, safetensors_metadata(path).get("encoder_info")
        if text is None:
            return None
    try:
        tree = json.loads(text)
    except ValueError:
        raise ExportError(f"{source}: the encoder description is not JSON; re-export the encoder with "
                          "tools.export") from None
    return parse_info(tree, source)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} cannot be read as UTF-8 text ({type(exc).__name__})") from None


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` holds a safetensors file (an 8-byte header length, then the JSON header),
    whatever its name: ``tools.export --format safetensors --out encoder.pth`` is one too."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size


def safetensors_metadata(path: Path) -> dict[str, str]:
    """A ``.safetensors`` file's metadata (``{}`` for other files or none)."""
    if not is_safetensors(path):
        return {}
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise ExportError(f"reading {path} needs the safetensors package: {SAFETENSORS_HINT}") from exc
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ExportError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None


# --------------------------------------------------------------------------- checking a description


def shown(value: Any) -> str:
    """``value`` as text short enough for a one-line error."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _triple(low: float, high: float, open_low: bool):
    def ok(v: Any) -> bool:
        return (isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)
                and all((x > low if open_low else x >= low) and x <= high for x in v))
    return ok


def _stretches_ok(v: Any) -> bool:
    pairs = isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and all(_is_int(x) for x in p) for p in v)
    return pairs and all(MIN_RESOLUTION <= side <= MAX_RESOLUTION for _, side in v) and all(
        a[0] < b[0] for a, b in zip(v, v[1:])) and all(step >= 0 for step, _ in v)


def _classes_ok(v: Any) -> bool:
    return v is None or (isinstance(v, list) and len(v) >= 1 and all(isinstance(c, str) for c in v)
                         and len(set(v)) == len(v))


# field: (whether it is required, test of the JSON value, what it must be)
FIELD_RULES = {
    "arch": (True, lambda v: isinstance(v, str) and 0 < len(v) <= 200, "an encoder name (checked next)"),
    "resolution": (True, lambda v: _is_int(v) and MIN_RESOLUTION <= v <= MAX_RESOLUTION,
                   f"an integer image side in [{MIN_RESOLUTION}, {MAX_RESOLUTION}]"),
    "mean": (True, _triple(0.0, 1.0, open_low=False), "3 finite numbers in [0, 1] (per-channel means)"),
    "std": (True, _triple(0.0, 1.0, open_low=True), "3 finite numbers in (0, 1] (per-channel std)"),
    "method": (False, lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
    "labeled_list": (False, lambda v: v is None or (isinstance(v, str) and v.strip() != "" and "\0" not in v),
                     "null or a file name"),
    "labeled_fraction": (False, lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "seed": (False, lambda v: _is_int(v) and 0 <= v < 2 ** 32, "an integer in [0, 2**32)"),
    "checkpoint": (False, lambda v: v is None or isinstance(v, str), "null or text"),
    "global_step": (False, lambda v: v is None or (_is_int(v) and v >= 0), "null or an integer >= 0"),
    "trained_resolutions": (False, _stretches_ok, "a list of [global step, image side] pairs, steps ascending"),
    "classes": (False, _classes_ok, "null or a list of distinct class names"),
}


def parse_info(tree: Any, source: str | Path) -> EncoderInfo:
    """``tree`` (a parsed sidecar) as an ``EncoderInfo``; ``ExportError`` naming the first field
    that is unknown, missing or out of its rule, and ``source``."""
    redo = "re-export the encoder with tools.export"
    if not isinstance(tree, dict):
        raise ExportError(f"{source}: the encoder description is not a JSON object; {redo}")
    unknown = sorted(k for k in tree if k not in FIELD_RULES)
    if unknown:
        raise ExportError(f"{source}: unknown field {shown(unknown[0])} (this version reads "
                          f"{', '.join(FIELD_RULES)}); {redo}")
    for name, (required, ok, rule) in FIELD_RULES.items():
        if name not in tree:
            if required:
                raise ExportError(f"{source}: field {name!r} is missing; {redo}")
        elif not ok(tree[name]):
            raise ExportError(f"{source}: {name} must be {rule}, got {shown(tree[name])}; {redo}")
    try:
        check_arch(tree["arch"])
    except ValueError as exc:  # an unknown name, or a timm model without timm installed
        raise ExportError(f"{source}: arch: {exc}") from None
    values = {**tree, "mean": tuple(tree["mean"]), "std": tuple(tree["std"])}
    if "trained_resolutions" in tree:
        values["trained_resolutions"] = tuple(tuple(p) for p in tree["trained_resolutions"])
    if tree.get("classes") is not None:
        values["classes"] = tuple(tree["classes"])
    return EncoderInfo(**values)


def info_json(info: EncoderInfo) -> str:
    """The sidecar's text (what ``read_info`` parses back)."""
    return json.dumps(dataclasses.asdict(info), indent=2) + "\n"
