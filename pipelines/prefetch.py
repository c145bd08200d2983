"""Host work of a data stream run ahead in a thread, in order, a bounded number of items ahead.

A loader's host side (reading encoded images, checking them, drawing each view's parameters)
would otherwise run in the training thread whenever the pipeline asks for the next batch.
``Prefetcher`` computes ``make(item)`` for each item in order in one thread, ``depth`` results
ahead of the consumer; the results (or the first error, which ends the pass) come out in
order, so the stream is the same as computing them in the consumer.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable

_END = object()


class Prefetcher:
    """``next()`` returns ``make(item)`` for each of ``items`` in order, computed in a thread up to
    ``depth`` results ahead; after the last it raises ``StopIteration``, and an error raised by
    ``make`` is raised by the ``next()`` that would have returned its result (nothing after it is
    computed). ``stop()`` abandons the rest."""

    def __init__(self, make: Callable[[Any], Any], items: Iterable, depth: int, name: str = "prefetch"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(make, list(items)), name=name, daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[Any], Any], items: list) -> None:
        for item in items:
            try:
                result = (True, make(item))
            except BaseException as exc:  # noqa: BLE001 (handed over to the consumer, which raises it)
                self._put((False, exc))
                return
            if not self._put(result):
                return
        self._put((True, _END))

    def _put(self, result: tuple) -> bool:
        """Queue ``result`` unless stopped first; whether it was queued."""
        while not self._stopped.is_set():
            try:
                self._queue.put(result, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> Any:
        if self._done:
            raise StopIteration
        ok, value = self._queue.get()
        if ok and value is not _END:
            return value
        self._done = True
        if not ok:
            raise value
        raise StopIteration

    def stop(self) -> None:
        """Stop computing (the item in progress is finished first) and wait for the thread."""
        self._stopped.set()
        self._done = True
        self._thread.join()
