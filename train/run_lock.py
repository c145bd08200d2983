"""One run per ``run.output_dir``: a lock on ``<run dir>/.lock`` held for the run's life
(and one conversion per ``--out``: ``DirLock`` on ``.convert.lock``, taken by the converter).

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
import stat
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used: a file, not writable, or in use by another run."""


class DirLock:
    """Hold ``directory``'s lock file ``name`` until ``release`` or process exit. ``option`` (the
    setting that named the directory) and ``user`` (what holds it) word the refusals."""

    def __init__(self, directory: str | os.PathLike, name: str, option: str, user: str, record: bool = True):
        """``record=False`` writes nothing into the file (``check``: a dry run writes nothing)."""
        self.run_dir = Path(directory)
        where = f"{option} {self.run_dir}"
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"{where} is a file; give a directory")
        lock = self.run_dir / name
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # never through a link: another user could point it at any file this process may write
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RunDirError(f"{where}: {lock} is a symbolic link; remove it (nothing here is written "
                                  "through links)") from None
            raise RunDirError(f"{where} cannot be written: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunDirError(f"{where}: {lock} is not a regular file; remove it")
        if not os.access(self.run_dir, os.W_OK):  # an existing lock file opens in a read-only folder
            os.close(fd)
            raise RunDirError(f"{where} cannot be written: the folder is read-only")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise RunDirError(f"{where}: cannot lock {name}: {exc.strerror}") from exc
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise RunDirError(f"{where} is in use by another {user} ({_describe(holder)}); "
                              f"wait for it to end, or choose another {option}") from None
        self._fd = fd
        if record:
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunLock(DirLock):
    """One run per ``run.output_dir``."""

    def __init__(self, run_dir: str | os.PathLike, record: bool = True):
        super().__init__(run_dir, LOCK_NAME, "run.output_dir", "run", record)

    @staticmethod
    def check(run_dir: str | os.PathLike) -> None:
        """Raise ``RunDirError`` where ``RunLock(run_dir)`` would, creating nothing (``--dry-run``)."""
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"run.output_dir {run_dir} is a file; give a directory")
        existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("."))
        if not os.access(existing, os.W_OK):
            raise RunDirError(f"run.output_dir {run_dir} cannot be written: no write permission on {existing}")
        if os.path.lexists(run_dir / LOCK_NAME):
            # a held lock refuses, naming its holder; a link or other file is refused; a free one is let go at once
            RunLock(run_dir, record=False).release()


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
