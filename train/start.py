"""Where a run starts: fresh, or from which checkpoint (``--resume``, and torchrun's restarts)."""
from __future__ import annotations

import os
from pathlib import Path

from train import checkpoint as ckpt
from train.config import ConfigError


def resolve_resume(resume: str, run_dir: Path) -> tuple[dict, Path] | None:
    """The checkpoint ``--resume`` names, loaded, with its path; None for a fresh start.
    ``ConfigError`` for what cannot be resumed, in one line."""
    if resume == "none":
        existing = ckpt.list_checkpoints(run_dir)
        if existing:
            raise ConfigError(f"{run_dir} already holds checkpoints (newest {existing[-1].name}); "
                              "pass --resume auto to continue it, or choose another run.output_dir")
        return None
    path = run_dir if resume == "auto" else Path(resume)
    if resume != "auto" and not (path.is_dir() or path.is_file()):  # a pipe would block the reader
        raise ConfigError(f"--resume: no checkpoint file or run folder at {path}")
    try:
        if path.is_dir() or resume == "auto":  # a run folder: its newest readable checkpoint
            loaded = ckpt.load_latest(path)
            if loaded is None and resume != "auto":
                raise ConfigError(f"--resume {path}: the folder holds no checkpoint (ckpt-*.pt)")
        else:
            loaded = ckpt.load(path), path
        return None if loaded is None else (ckpt.require_training_state(*loaded), loaded[1])
    except ckpt.CheckpointError as exc:  # not what train.pretrain writes: named in one line
        raise ConfigError(f"--resume: {exc}") from None


def resume_after_restart(resume: str, run_dir: Path, is_main: bool) -> str:
    """``--resume`` as given, or ``auto`` when torchrun restarted the group and the run directory
    holds checkpoints: the group continues from where it got, not from its starting point."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and resume != "auto" and (resume == "none" or ckpt.list_checkpoints(run_dir)):
        if is_main:
            print("note: torchrun restarted the workers; resuming from the newest checkpoint (--resume auto)")
        return "auto"
    return resume
