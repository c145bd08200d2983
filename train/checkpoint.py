"""Atomic checkpoints, safe to load, and ``--resume auto``.

A checkpoint is written to a temporary file in the same directory, flushed
to disk, then renamed to ``ckpt-<global step>.pt``: a kill at any moment
leaves either the old set of complete files or the new one, never a partial
file under a checkpoint name. ``load_latest`` ignores temporary files and
falls back to an older checkpoint if the newest cannot be loaded.

Every file written here holds tensors and plain Python types only (the RNG
states too), so it loads with ``torch.load(path, weights_only=True)``: a
downloaded checkpoint cannot run code when loaded, and this project loads
nothing otherwise (``load``). Files get the permissions of the umask, as
``open`` would give them (0644 under umask 022), so teammates can read them.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, IO

import numpy as np
import torch

CKPT_PATTERN = re.compile(r"^ckpt-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_path(run_dir: Path, global_step: int) -> Path:
    return Path(run_dir) / f"ckpt-{global_step:09d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), run_dir / name) for name in os.listdir(run_dir) if (m := CKPT_PATTERN.match(name))]
    return [p for _, p in sorted(found)]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], what: str = "checkpoint") -> None:
    """``write`` a file into a temp file beside ``path``, fsync, rename over ``path``. The rename
    replaces a symbolic link at ``path`` instead of writing through it. On any error the temp file
    is removed, ``path`` (if it existed) is untouched, and ``CheckpointError`` names ``what``."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + path.name + ".", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is shared like any file
    except OSError as exc:  # read-only or full file system, directory gone, no permission
        raise CheckpointError(f"could not write {what} {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(f"could not write {what} {path}: {exc}") from exc
        raise


def save_atomic(obj: Any, path: Path, what: str = "checkpoint") -> None:
    """``torch.save(obj)`` to ``path`` through ``write_atomic``."""
    write_atomic(path, lambda f: torch.save(obj, f), what)


def write_text_atomic(path: Path, text: str, what: str = "file") -> None:
    """UTF-8 ``text`` to ``path`` through ``write_atomic``."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")), what)


def save_checkpoint(state: dict, run_dir: Path, global_step: int, keep: int) -> Path:
    path = checkpoint_path(run_dir, global_step)
    save_atomic(state, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain types, never code.
    ``CheckpointError`` names a file that holds anything else (or is no torch file at all)."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a readable checkpoint (not a file written by torch.save)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} holds more than tensors and plain values, so it is not loaded (it could run "
                              "code); re-save it with this version from a source you trust") from exc
    except Exception as exc:  # truncated, damaged, unreadable: torch raises many types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path} is not a readable checkpoint: {type(exc).__name__}: {first_line}") from exc


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
    """Newest loadable checkpoint in ``run_dir`` (None when there is none)."""
    errors = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load(path, map_location), path
        except CheckpointError as exc:  # a damaged file: try the previous one, but say so
            errors.append(f"{path.name}: {exc}")
            print(f"warning: skipping unreadable checkpoint {path}: {exc}", flush=True)
    if errors:
        raise CheckpointError(f"no loadable checkpoint in {run_dir}: " + "; ".join(errors))
    return None


def rng_state() -> dict:
    """Every global RNG's state as tensors and plain types (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
