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
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, IO

import numpy as np
import torch

from pipelines.atomic_write import write_atomically

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


def write_atomic(path: Path, write: Callable[[IO[bytes]], None], what: str = "checkpoint") -> None:
    """``pipelines.atomic_write.write_atomically`` (a temp file renamed over ``path``: a link at
    ``path`` is replaced, not written through), with a file-system error as ``CheckpointError``
    naming ``what``; ``path`` (if it existed) is then untouched."""
    try:
        write_atomically(path, write)
    except (OSError, RuntimeError) as exc:  # read-only or full file system (torch.save raises RuntimeError), ...
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        try:
            free = f"; {shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = ""
        raise CheckpointError(f"could not write {what} {path} ({first_line}){free}; the previous files are "
                              "kept") from exc


def save_atomic(obj: Any, path: Path, what: str = "checkpoint") -> None:
    """``torch.save(obj)`` to ``path`` through ``write_atomic``."""
    write_atomic(path, lambda f: torch.save(obj, f), what)


def write_text_atomic(path: Path, text: str, what: str = "file") -> None:
    """UTF-8 ``text`` to ``path`` through ``write_atomic``."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")), what)


TRAINING_KEYS = ("model", "optimizer", "train_state", "config", "world_size")
# pipelines.atomic_write's temp files (mkstemp's 8 characters) of the files a run writes itself
TEMP_PATTERN = re.compile(r"^\.tmp-(ckpt-\d{9}\.pt|config\.yaml|summary\.json|metrics\.csv|curves\.png|wandb_run_id"
                          r"|encoder_[^/]+)\.[A-Za-z0-9_]{8}$")


def save_checkpoint(state: dict, run_dir: Path, global_step: int, keep: int) -> Path:
    """Write ``ckpt-<global_step>.pt`` and delete all but the ``keep`` newest checkpoints up to
    this step. Files of later steps are left alone: they are from a damaged or abandoned
    future of the run (``--resume auto`` fell back past them), not older than this one."""
    path = checkpoint_path(run_dir, global_step)
    save_atomic(state, path)
    upto = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) <= global_step]
    for old in upto[:-keep]:
        old.unlink(missing_ok=True)
    return path


def checkpoint_step(path: Path) -> int:
    return int(CKPT_PATTERN.match(Path(path).name).group(1))


def remove_stale_temp_files(run_dir: Path) -> list[str]:
    """Delete the temp files of writes that a killed run left in ``run_dir`` (call it holding the
    run lock: then no write of ours is in progress); returns their names."""
    removed = []
    for name in sorted(os.listdir(run_dir)) if Path(run_dir).is_dir() else []:
        path = Path(run_dir) / name
        if TEMP_PATTERN.match(name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(name)
    return removed


def require_training_state(state: Any, path: Path) -> dict:
    """``state`` when it is what ``train.pretrain`` saves; else ``CheckpointError`` naming ``path``."""
    missing = [k for k in TRAINING_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        kind = "an exported encoder (evaluate it with train.evaluate)" if isinstance(state, dict) and any(
            not isinstance(v, dict) for v in state.values()) else "not a training checkpoint"
        raise CheckpointError(f"{path} cannot be resumed: it is {kind}, with no {', '.join(missing)} "
                              "(train.pretrain writes ckpt-*.pt files in run.output_dir)")
    return state


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


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG states as tensors and plain types (``weights_only``-loadable): Python's,
    numpy's, torch's CPU generator and, on a CUDA ``device``, that device's generator only (the
    other visible devices are other ranks' to save)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_rng_states(device: torch.device) -> dict | None:
    """``{"ranks": [rng_state(device) of rank 0, 1, ...]}`` on rank 0, None on the others: what a
    checkpoint keeps. A collective when distributed: call it on every rank."""
    own = rng_state(device)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return {"ranks": [own]}
    main = torch.distributed.get_rank() == 0
    ranks = [None] * torch.distributed.get_world_size() if main else None
    torch.distributed.gather_object(own, ranks, dst=0)
    return {"ranks": ranks} if main else None


def set_rng_state(state: dict, rank: int = 0, device: torch.device | None = None) -> None:
    """Restore rank ``rank``'s generators from a checkpoint's ``state`` (``gather_rng_states``), its
    CUDA generator into ``device``. On another number of ranks, rank r takes saved rank
    ``r mod (saved ranks)``'s. A checkpoint of an older version holds rank 0's states, with CUDA
    as every device rank 0 saw: ``device`` takes the entry of its index when there is one."""
    if "ranks" in state:
        own = state["ranks"][rank % len(state["ranks"])]
        cuda = own.get("cuda")
    else:
        own, devices = state, state.get("cuda") or []
        cuda = devices[device.index or 0] if device is not None and (device.index or 0) < len(devices) else None
    py, npy = own["python"], own["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(own["torch"])
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
