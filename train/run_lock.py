"""One run per ``run.output_dir``: a lock on ``<run dir>/.lock`` held for the run's life.

A second run started on the same directory would interleave ``metrics.csv``
and overwrite the first one's checkpoints, config and export. The lock is an
advisory POSIX record lock (``fcntl.lockf``), which belongs to the process
that took it: the kernel drops it when that process dies, however it dies,
and forked DataLoader workers do not inherit it (an ``flock`` would stay held
by a worker that outlives a SIGKILLed trainer), so a killed run never blocks
its own ``--resume auto``. The file records who holds it, for the refusal
message. Such a lock is dropped when the process closes *any* descriptor of
the file, so nothing else in the process opens it. (On some network file
systems locks are local to one machine; runs sharing a directory across nodes
are then not detected.)
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used: a file, not writable, or in use by another run."""


class RunLock:
    """Hold ``run_dir``'s lock until ``release`` or process exit."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"run.output_dir {self.run_dir} is a file; give a directory")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"run.output_dir {self.run_dir} cannot be written: {exc.strerror or exc}") from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise RunDirError(f"run.output_dir {self.run_dir}: cannot lock {LOCK_NAME}: {exc.strerror}") from exc
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise RunDirError(f"run.output_dir {self.run_dir} is in use by another run ({_describe(holder)}); "
                              "wait for it to end, or choose another run.output_dir") from None
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    @staticmethod
    def check(run_dir: str | os.PathLike) -> None:
        """Raise ``RunDirError`` where ``RunLock(run_dir)`` would, creating nothing (``--dry-run``)."""
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"run.output_dir {run_dir} is a file; give a directory")
        existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("."))
        if not os.access(existing, os.W_OK):
            raise RunDirError(f"run.output_dir {run_dir} cannot be written: no write permission on {existing}")
        if (run_dir / LOCK_NAME).exists():
            RunLock(run_dir).release()  # a held lock refuses, naming its holder; a free one is let go at once

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
