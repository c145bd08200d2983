"""Checkpoint and stop when the cluster says so: SIGTERM (SLURM before preemption and at the time
limit; torchrun passes it on to its workers) and SIGUSR1 by default (``run.preempt_signals``).

The signal handler only sets a flag. The training loop asks ``agreed`` after each step: one process
stops at the next step; several ranks compare their flags with one all-reduce (a sum) at every log
step and at the end of each epoch (steps every rank reaches together, so the collective is safe),
and all stop there together. The trainer then writes a checkpoint at that step and the program
exits with ``PREEMPTED_EXIT`` (143, the shell's code for a process ended by SIGTERM);
``--resume auto`` continues from that step exactly.
"""
from __future__ import annotations

import signal
import sys

import torch

from train.distributed import all_reduce_sum

PREEMPTED_EXIT = 143


class Preempted(Exception):
    """The run was asked to stop by a signal; its checkpoint is written."""


def signal_numbers(names) -> list[int]:
    """``SIGTERM``-style names (or ``TERM``) as signal numbers; ValueError naming an unknown one."""
    numbers = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if not hasattr(signal.Signals, key) or key in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"run.preempt_signals: {name!r} is not a signal a process can catch")
        numbers.append(int(signal.Signals[key]))
    return numbers


class Preemption:
    """Installs the handlers for the run's lifetime (a context manager; the main thread only)."""

    def __init__(self, names, distributed: bool, device: torch.device):
        self.numbers = signal_numbers(names)
        self.distributed, self.device = distributed, device
        self.received: str | None = None  # the name of the first signal received
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        for number in self.numbers:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
            print(f"note: {self.received} received: the run stops after this step and writes a checkpoint",
                  file=sys.stderr, flush=True)

    def agreed(self, collective_point: bool) -> bool:
        """Whether the run stops after the current step: at once on one process; on several, at
        ``collective_point`` steps (the same on every rank), when any rank received a signal."""
        if not self.distributed:
            return self.received is not None
        if not collective_point:
            return False
        return all_reduce_sum(int(self.received is not None), self.device) > 0
