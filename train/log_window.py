"""What one row of metrics.csv averages: the steps since the previous row."""
from __future__ import annotations

import time


class LogWindow:
    """The steps since the last log row: each logged loss is their mean (steps read back one by one
    with ``compute.host_sync=step``, or together at the log step), ``images_per_s`` and
    ``data_wait_frac`` are over the window's wall time."""

    def __init__(self) -> None:
        self.start, self.images, self.waited = time.perf_counter(), 0, 0.0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, read_back: dict[str, float]) -> None:
        steps = int(read_back.pop("steps", 1))
        for key, value in read_back.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * steps
            self.counts[key] = self.counts.get(key, 0) + steps

    def means(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        out = {key: self.sums[key] / self.counts[key] for key in self.sums}
        return out | {"images_per_s": self.images / seconds, "data_wait_frac": self.waited / seconds}
