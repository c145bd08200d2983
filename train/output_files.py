"""Files a tool is asked to write: refused before any work, naming why, never half written.

``tools.export``, ``train.evaluate --output`` and the fine-tuned model check every file they
will write here first, so that a run of minutes is not lost to a missing folder at its end,
and a file the user did not name (a sidecar beside ``--out``) is not replaced unasked.
"""
from __future__ import annotations

import os
from pathlib import Path

from train.config import ConfigError


def check_writable(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a ``Path`` when a file can be written there; ``ConfigError`` naming ``flag``
    when it names a folder (``DIR/`` too, which ``Path`` would read as ``DIR``) or its folder is
    missing or read-only."""
    text = os.fspath(path)
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise ConfigError(f"{flag} {text} is a directory; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: folder {path.parent} is not writable")
    return path


def refuse_existing(paths: tuple[Path, ...] | list[Path], flag: str, remedy: str, replace: bool = False) -> None:
    """``ConfigError`` naming every one of ``paths`` that exists (a link included) and ``remedy``,
    unless ``replace``; a folder among them is refused either way."""
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise ConfigError(f"{flag}: {folders[0]} is a directory, where a file is to be written; choose another {flag}")
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing and not replace:
        raise ConfigError(f"{flag}: {' and '.join(existing)} exist{'s' if len(existing) == 1 else ''}; {remedy}")
