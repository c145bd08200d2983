"""The converter's options and its error, shared by the command line and the per-split work."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("ffcv", "dali")


class ConversionError(RuntimeError):
    """The conversion cannot proceed; the message says why and what to do."""


SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass
class ConvertOptions:
    """The command-line options as a typed object; ``tools.convert_imagenet.build_parser`` says
    what each one means."""

    src: str
    out: str
    splits: tuple[str, ...] = ("train", "val")
    formats: tuple[str, ...] = FORMATS
    labeled_list: str | None = None
    labeled_fraction: float | None = None
    labeled_split: str = "train"
    seed: int = 0
    max_resolution: int = 512
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    shard_size: int = 1024
    shard_multiple: int = 64
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    strict: bool = False
    allow_missing: bool = False  # a labeled list may name absent, ambiguous or unreadable files (they are left out)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.splits = tuple(self.splits)
        self.formats = tuple(self.formats)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"--splits must name distinct splits, got {','.join(self.splits) or 'nothing'}")
        bad = [s for s in self.splits if not SPLIT_NAME.fullmatch(s) or s.endswith(".partial")]
        if bad:  # a split names folders under --out: '..' or 'a/b' would reach outside them
            raise ValueError(f"--splits takes plain folder names (letters, digits, '.', '-', '_', not starting with "
                             f"'.' nor ending with '.partial'), got {', '.join(repr(s) for s in bad)}")
        if not self.formats or not set(self.formats) <= set(FORMATS):
            raise ValueError(f"--formats must be a non-empty subset of {','.join(FORMATS)}, got {','.join(self.formats) or 'nothing'}")
        if self.labeled_list is not None and self.labeled_fraction is not None:
            raise ValueError("give --labeled-list or --labeled-fraction, not both")
        if self.labeled_fraction is not None and not 0 < self.labeled_fraction <= 1:
            raise ValueError(f"--labeled-fraction must be in (0, 1], got {self.labeled_fraction}")
        if self.max_resolution < 1:
            raise ValueError(f"--max-resolution must be >= 1, got {self.max_resolution}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}")
        if not 0 <= self.compress_probability <= 1:
            raise ValueError(f"--compress-probability must be in [0, 1], got {self.compress_probability}")
        if self.shard_size < 1 or self.shard_multiple < 1 or self.jobs < 1:
            raise ValueError(f"--shard-size, --shard-multiple and --jobs must be >= 1, got {self.shard_size}, "
                             f"{self.shard_multiple} and {self.jobs}")

    def settings(self, classes: list[str]) -> dict:
        """Everything the outputs depend on; a rerun in the same ``--out`` must match it."""
        labeled = None
        if self.labeled_list is not None:
            path = Path(self.labeled_list).resolve()
            labeled = {"split": self.labeled_split, "list": str(path),
                       "list_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        elif self.labeled_fraction is not None:
            labeled = {"split": self.labeled_split, "fraction": self.labeled_fraction, "seed": self.seed}
        return {
            "src": str(Path(self.src).resolve()),
            "formats": sorted(self.formats),
            "ffcv": {"write_mode": "proportion", "max_resolution": self.max_resolution,
                     "jpeg_quality": self.jpeg_quality, "compress_probability": self.compress_probability},
            "dali": {"shard_size": self.shard_size, "shard_multiple": self.shard_multiple,
                     "reencode_quality": self.jpeg_quality},
            "labeled": labeled,
            "classes": classes,
        }
