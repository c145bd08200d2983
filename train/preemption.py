"""Checkpoint and stop when the cluster says so: SIGTERM (SLURM before preemption and at the time
limit; torchrun passes it on to its workers) and SIGUSR1 by default (``run.preempt_signals``).

The training loop asks ``agreed`` after each step: one process stops at the next step; several
ranks compare their flags with one all-reduce (a sum) at every log step and at the end of each
epoch (steps every rank reaches together, so the collective is safe), and all stop there
together. The trainer then writes a checkpoint at that step and the program exits with
``PREEMPTED_EXIT`` (143, the shell's code for a process ended by SIGTERM); ``--resume auto``
continues from that step exactly.

- **The trainer alone decides.** While the run trains, its main thread blocks these signals, and
  every child process it starts (DataLoader workers of the training stream and of the kNN sets)
  inherits them blocked, so they never act on them. torchrun's agent signals each worker's whole
  process group (``os.killpg``) and SLURM every process of a job step: a DataLoader worker ended
  by the signal ended the run without its checkpoint.
- **A watcher thread** receives the signals (it alone unblocks them) through
  ``signal.set_wakeup_fd``, so it sees them even while the main thread is stuck in a step or a
  collective that never ends.
- **A second signal, or ``run.preempt_grace_s`` seconds after the first** without the run having
  stopped, ends the process at once (exit ``FORCED_EXIT``, with a message): the step in flight is
  lost, and the last checkpoint stays intact (checkpoints are written to a temp file and renamed).
- **At exit**, multiprocessing ends the daemonic children still alive (DataLoader workers a loader
  never shut down) with SIGTERM and waits for them: with SIGTERM blocked in them it waited for
  ever, after the run had ended. ``_end_children_at_exit`` (an ``atexit`` hook registered after
  multiprocessing's, so it runs first) ends them with SIGKILL instead.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import select
import signal
import threading
import time

import torch

from train.distributed import all_reduce_sum

PREEMPTED_EXIT = 143
FORCED_EXIT = 1
_STOP = 0  # written to the wakeup pipe by __exit__: no signal has the number 0


def _end_children_at_exit() -> None:
    """SIGKILL for the daemonic children still alive at exit: they block SIGTERM, the signal
    multiprocessing's own exit hook ends them with before waiting for them. torch's SIGCHLD
    handler is removed first: it reports a DataLoader worker ended by a signal as a failure
    (a traceback after a run that had finished)."""
    children = [c for c in multiprocessing.active_children() if c.daemon and c.pid is not None]
    if not children:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for child in children:
        child.join(timeout=5)


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


def _say(text: str) -> None:
    """One line on stderr without Python's stream lock, which a stuck main thread may hold."""
    os.write(2, (text + "\n").encode())


def _leave_to_the_watcher(number: int, frame) -> None:
    """The Python-level handler: installed so that the signal's default action (the end of the
    process) does not apply; the watcher thread acts on it."""


class Preemption:
    """Installs the handlers and the watcher for the run's training (a context manager; the main
    thread only). ``run_dir`` names where the last checkpoint is in the forced-stop message."""

    def __init__(self, names, distributed: bool, device: torch.device, grace_s: float = 120.0, run_dir: str = ""):
        self.numbers = signal_numbers(names)
        self.distributed, self.device = distributed, device
        self.grace_s, self.run_dir = grace_s, run_dir
        self.received: str | None = None  # the name of the first signal received
        self._previous: dict[int, object] = {}
        self._previous_wakeup_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> Preemption:
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[1], False)  # set_wakeup_fd's requirement
        for number in self.numbers:
            self._previous[number] = signal.signal(number, _leave_to_the_watcher)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="preemption-watcher", daemon=True)
        self._watcher.start()  # before the block: it inherits the signals unblocked
        atexit.unregister(_end_children_at_exit)  # registered once, after multiprocessing's (LIFO: runs first)
        atexit.register(_end_children_at_exit)
        signal.pthread_sigmask(signal.SIG_BLOCK, self.numbers)
        return self

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.numbers)
        os.write(self._pipe[1], bytes([_STOP]))  # not the pipe's end: forked workers hold copies of it
        self._watcher.join()
        for fd in self._pipe:
            os.close(fd)
        self._pipe = self._watcher = None

    def _watch(self) -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.numbers)
        read_fd, deadline = self._pipe[0], None
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([read_fd], [], [], wait)[0]:
                self._force(f"{self.received} came {self.grace_s:g} s ago and the run has not reached its "
                            f"checkpoint (a step or a collective that does not end?; run.preempt_grace_s="
                            f"{self.grace_s:g})")
            data = os.read(read_fd, 256)
            if _STOP in data:
                return
            for number in (n for n in data if n in self.numbers):
                name = signal.Signals(number).name
                if self.received is not None:
                    self._force(f"a second {name}")
                self.received, deadline = name, time.monotonic() + self.grace_s
                _say(f"note: {name} received: the run stops after this step and writes a checkpoint (a second "
                     f"signal, or {self.grace_s:g} s without stopping, ends it at once without one)")

    def _force(self, reason: str) -> None:
        where = f" in {self.run_dir}" if self.run_dir else ""
        _say(f"error: {reason}: the run stops now, without finishing its step or writing a checkpoint; the last "
             f"checkpoint{where} stays intact (continue with --resume auto)")
        os._exit(FORCED_EXIT)

    def agreed(self, collective_point: bool) -> bool:
        """Whether the run stops after the current step: at once on one process; on several, at
        ``collective_point`` steps (the same on every rank), when any rank received a signal."""
        if not self.distributed:
            return self.received is not None
        if not collective_point:
            return False
        return all_reduce_sum(int(self.received is not None), self.device) > 0
