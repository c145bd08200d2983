"""Writing a whole file so that readers see the old or the new one, never part of it, and never through a link.

The data goes to a new temporary file beside the target (``mkstemp``: a fresh name, created
exclusively), is flushed to disk, and is renamed over the target. A symbolic link at the target
is replaced by the rename, not followed: a link planted in a shared run or output folder cannot
make this project overwrite the file it points to.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None], mode: int | None = None) -> None:
    """``write`` the content of ``path`` into a temp file, fsync it, rename it over ``path``.
    ``mode`` (default: 0o666 less the umask) sets its permissions. On any error the temp file is
    removed, ``path`` is as it was, and the error (an ``OSError`` for the file system's) propagates."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)  # mkstemp makes 0600
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
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """UTF-8 ``text`` to ``path`` through ``write_atomically``."""
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
