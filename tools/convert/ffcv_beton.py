"""The FFCV ``.beton`` writer: fields ``image``, ``label``, ``index`` in that order."""
from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.queues
import os
import queue
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tools.convert.source import SourceChanged, Verdict, load_rgb

INSTALL_HINT = "pip install .[ffcv]  (from the repository root; or `make setup`)"


def require_ffcv() -> None:
    """Import FFCV's writer, or raise ``ImportError`` naming the extra to install.

    Importing FFCV sets torch's thread count to 1 (``ffcv.pipeline.compiler``);
    a count set before the import is put back, so converting in-process does
    not slow down the caller's torch.
    """
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        import ffcv.writer  # noqa: F401
    except ImportError as e:
        raise ImportError(f"writing FFCV .beton files needs ffcv, which failed to import ({e}); install it with: {INSTALL_HINT}") from e
    finally:
        if threads is not None:
            torch.set_num_threads(threads)


class _Samples:
    """FFCV indexed dataset: ``(uint8 HWC RGB, label, index)``.

    FFCV's writer processes wait forever for a sample whose worker raised, so
    a decoding failure is recorded in ``errors_path`` and a 1x1 black image is
    returned in its place; the caller checks that file and fails the split.
    """

    def __init__(self, items: list[tuple[str, int]], errors_path: str, max_resolution: int):
        self.items = items
        self.errors_path = errors_path
        self.max_resolution = max_resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            image = load_rgb(path)
            height, width = image.shape[:2]
            if min(height, width) * self.max_resolution < max(height, width):
                # FFCV's resizer would make the short side 0 pixels, and its worker would die.
                raise ValueError(f"{width}x{height} is too elongated to fit a max side of {self.max_resolution}")
        except Exception as e:  # noqa: BLE001 - reported through errors_path, see class docstring
            with open(self.errors_path, "a") as f:
                f.write(f"{path}\t{type(e).__name__}: {e}\n")
            image = np.zeros((1, 1, 3), np.uint8)
        return image, label, index


class WriterWorkerDied(RuntimeError):
    """A process of FFCV's writer died (a full disk, an I/O error, the OOM killer)."""


class _WorkerWatch:
    """Ends FFCV's writer when one of its worker processes dies.

    FFCV's ``DatasetWriter`` polls a shared counter until every sample is written, then waits
    on a queue for each worker's page table: a worker that dies (ENOSPC while writing a page)
    leaves both waits, and the workers waiting for its page, blocked forever. The writer's
    ``Process``, ``Queue`` and ``sleep`` are replaced for one write (``write_beton``) by these,
    which record the workers and, in the writing process only, check them while waiting: a
    dead worker's exit code ends the write with ``WriterWorkerDied``, the others terminated."""

    def __init__(self):
        self.owner = os.getpid()
        self.workers: list[multiprocessing.Process] = []
        self.queues: list[_WatchedQueue] = []
        self.errors = multiprocessing.SimpleQueue()  # a dying worker's error, in one line (not a file: the disk may be full)

    def guarded_job(self, job: Callable) -> Callable:
        return functools.partial(_run_guarded, job, self.errors)

    def process(self, *args, **kwargs) -> multiprocessing.Process:
        worker = multiprocessing.Process(*args, **kwargs)
        self.workers.append(worker)
        return worker

    def queue(self) -> "_WatchedQueue":
        self.queues.append(_WatchedQueue(self))
        return self.queues[-1]

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
        self.check()

    def check(self) -> None:
        if os.getpid() != self.owner:  # a worker (forked with this object) has no children to check
            return
        dead = [w for w in self.workers if w.exitcode not in (None, 0)]
        if dead:
            for worker in self.workers:
                if worker.is_alive():
                    worker.terminate()
            for worker in self.workers:
                worker.join(5)
            error = self.errors.get() if not self.errors.empty() else f"exit code {dead[0].exitcode}"
            for q in self.queues:  # FFCV's work queue holds every chunk not taken: its feeder thread
                q.cancel_join_thread()  # would block the interpreter's exit on a pipe nobody reads
                q.close()
            raise WriterWorkerDied(f"a process of FFCV's .beton writer died: {error}")

    def close(self) -> None:
        self.errors.close()


def _run_guarded(job: Callable, errors: multiprocessing.SimpleQueue, *args) -> None:
    """A writer worker's ``job``; its error, if any, goes to ``errors`` in one line."""
    try:
        job(*args)
    except BaseException as exc:  # noqa: BLE001 - reported to the writing process, which ends the write
        errors.put(f"{type(exc).__name__}: {exc}")
        os._exit(1)


class _WatchedQueue(multiprocessing.queues.Queue):
    """A queue whose blocking ``get`` in the writing process checks the workers every half second."""

    def __init__(self, watch: _WorkerWatch):
        super().__init__(ctx=multiprocessing.get_context())
        self._watch = watch

    def get(self, block: bool = True, timeout: float | None = None):
        watch = getattr(self, "_watch", None)
        if not block or timeout is not None or watch is None or os.getpid() != watch.owner:
            return super().get(block, timeout)
        while True:
            try:
                return super().get(timeout=0.5)
            except queue.Empty:
                watch.check()


def _open_buffered(file, mode: str = "r", buffering: int = -1, *args, **kwargs):
    """``open`` for FFCV's page writer (``ffcv.memory_allocator``), buffered. It opens the ``.beton``
    unbuffered, whose ``write`` returns the bytes it wrote: on a full disk a page was cut short
    without an error (seen once pages became 2 MiB). A buffered file writes the rest or raises,
    in the worker, which ``_WorkerWatch`` reports."""
    return open(file, mode, -1 if buffering == 0 else buffering, *args, **kwargs)


@dataclass(frozen=True)
class BetonSettings:
    """The converter's FFCV options (their defaults live in ``ConvertOptions``)."""

    max_resolution: int  # longest side after resizing (FFCV's INTER_AREA, never upscales)
    jpeg_quality: int
    compress_probability: float  # 'proportion' mode: share of images stored JPEG, the rest raw


FFCV_MIN_PAGE = 1 << 21  # ffcv.writer.MIN_PAGE_SIZE: FFCV's writer refuses smaller pages
SAMPLES_PER_PAGE = 8  # a page holds at least this many of the largest samples
JPEG_SLACK = 4096  # bytes a JPEG may exceed its raw pixels by (headers and tables of a tiny image)


@dataclass(frozen=True)
class PagePlan:
    """How FFCV's writer lays out a ``.beton``: ``page_size`` bytes per page, ``workers`` processes.

    The writer pads the header to one page and each worker ends on a page of its own that it
    writes whole, filled or not; a page also ends with the gap left by the sample that did not
    fit. So the page is the smallest power of two (at least FFCV's 2 MiB) holding
    ``SAMPLES_PER_PAGE`` of the largest samples (the gap stays under 1/8 of a page), and each
    worker gets at least ``SAMPLES_PER_PAGE`` pages of the expected data (the last pages and the
    header's stay under about 1/8 of the file): 1,000 CIFAR images at 2 workers and 8 MiB pages
    were a 25 MB file for 2 MB of data, and are about 4 MB so."""

    page_size: int
    workers: int


def stored_raw_bytes(size: tuple[int, int], max_resolution: int) -> int:
    """Bytes of an image of ``size`` (width, height) stored raw: FFCV's ``resizer`` scales the
    longest side down to ``max_resolution`` (never up), truncating, then 3 bytes a pixel."""
    width, height = size
    ratio = max_resolution / max(width, height)
    if ratio < 1:
        width, height = int(ratio * width), int(ratio * height)
    return 3 * width * height


def plan_pages(verdicts: list[Verdict], settings: BetonSettings, jobs: int) -> PagePlan:
    """The ``PagePlan`` for the accepted images judged by ``verdicts``. The expected data counts a
    raw image at its raw bytes and a JPEG at its source file's bytes scaled by the resize."""
    raw = [stored_raw_bytes(v.size, settings.max_resolution) for v in verdicts]
    need = SAMPLES_PER_PAGE * (max(raw, default=0) + JPEG_SLACK)
    page_size = max(FFCV_MIN_PAGE, 1 << (need - 1).bit_length())
    share = settings.compress_probability
    expected = sum((1 - share) * r + share * min(r, v.nbytes * r / max(1, 3 * v.size[0] * v.size[1]))
                   for r, v in zip(raw, verdicts))
    workers = max(1, min(jobs, int(expected // (SAMPLES_PER_PAGE * page_size))))
    return PagePlan(page_size, workers)


def write_beton(path: Path, items: list[tuple[str, int]], settings: BetonSettings, pages: PagePlan,
                progress: bool = True) -> None:
    """Write ``items`` (absolute source path, label) to ``path`` laid out by ``pages``; sample ``i``
    gets index ``i``.
    FFCV's writer draws its own progress bar and has no switch for it; ``progress=False``
    (``--no-progress``) silences it through the name it calls.

    Raises ``SourceChanged`` listing the files that failed to decode.
    """
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    import ffcv.memory_allocator as ffcv_allocator
    import ffcv.writer as ffcv_writer
    from ffcv.writer import DatasetWriter

    fd, errors_path = tempfile.mkstemp(prefix="beton-errors-", suffix=".txt")  # outside --out: nothing of ours there
    os.close(fd)
    fields = {
        "image": RGBImageField(write_mode="proportion", max_resolution=settings.max_resolution,
                               jpeg_quality=settings.jpeg_quality, compress_probability=settings.compress_probability),
        "label": IntField(),
        "index": IntField(),
    }
    writer = DatasetWriter(str(path), fields, page_size=pages.page_size, num_workers=pages.workers)
    watch = _WorkerWatch()
    bar = ffcv_writer.tqdm  # labelled: FFCV's own bar says nothing of what it writes
    patched = {"tqdm": (functools.partial(bar, desc=f"writing {path.name}") if progress
                        else functools.partial(bar, disable=True)),
               "Process": watch.process, "Queue": watch.queue, "sleep": watch.sleep,
               "worker_job_indexed_dataset": watch.guarded_job(ffcv_writer.worker_job_indexed_dataset)}
    originals = {name: getattr(ffcv_writer, name) for name in patched}
    for name, value in patched.items():
        setattr(ffcv_writer, name, value)
    ffcv_allocator.open = _open_buffered  # the name its pages are opened by (a builtin until then)
    try:
        writer.from_indexed_dataset(_Samples(items, errors_path, settings.max_resolution), chunksize=100)
        with open(errors_path) as f:
            errors = f.read().strip()
    except WriterWorkerDied:
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()
        raise
    finally:
        for name, value in originals.items():
            setattr(ffcv_writer, name, value)
        del ffcv_allocator.open
        watch.close()
        os.remove(errors_path)
    if errors:
        raise SourceChanged(f"{path}: source files could not be written (changed since inspection?):\n{errors}")
