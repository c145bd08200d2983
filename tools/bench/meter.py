"""CPU cores and peak memory used by this process and its workers."""
from __future__ import annotations

import resource
import time


class ResourceMeter:
    """CPU cores used and peak resident memory of this process and its
    workers, between ``start`` and ``stop``. Uses psutil to see live worker
    processes; without it, ``resource.getrusage`` sees only this process and
    reaped children, and memory is their lifetime peak."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            psutil = None
        self._psutil = psutil
        self._proc = psutil.Process() if psutil else None
        self._t0 = self._cpu0 = 0.0
        self._peak = 0

    def _processes(self) -> list:
        return [self._proc] + self._proc.children(recursive=True)

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) of this process and its workers so far."""
        if self._psutil is None:
            own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        total = 0.0
        for proc in self._processes():
            try:
                t = proc.cpu_times()
            except self._psutil.Error:  # exited since listed
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def _rss_bytes(self) -> int:
        if self._psutil is None:  # lifetime peaks, in KiB on Linux
            own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return (own.ru_maxrss + kids.ru_maxrss) * 1024
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            try:  # unique pages only: forked workers share most of this process's
                total += child.memory_full_info().uss
            except self._psutil.Error:
                continue
        return total

    def start(self) -> None:
        self._t0, self._cpu0, self._peak = time.perf_counter(), self.cpu_seconds(), self._rss_bytes()

    def sample(self) -> None:
        self._peak = max(self._peak, self._rss_bytes())

    def stop(self) -> dict:
        wall = time.perf_counter() - self._t0
        cores = (self.cpu_seconds() - self._cpu0) / wall if wall > 0 else 0.0
        self.sample()
        return {"cpu_cores_used": cores, "peak_rss_mb": self._peak / 2**20}
