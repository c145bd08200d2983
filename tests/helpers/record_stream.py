"""``python -m tests.helpers.record_stream OUT.jsonl [train.pretrain args]``: run
``train.pretrain`` and append every step's ``(epoch, step, sample ids)`` to
OUT.jsonl as the loader hands it out, one flushed line per step, so that a
killed run's record survives it. ``RECORD_STEP_SLEEP`` (seconds) slows each
step down, giving a test time to kill the run where it wants.
"""
from __future__ import annotations

import json
import os
import sys
import time

from train import pretrain, trainer


def read_records(path: str | os.PathLike) -> list[dict]:
    """The recorded steps, in order; a line cut short by a kill (the last one) is dropped."""
    out = []
    for line in open(path).read().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


class RecordingLoader:
    """Wraps a ``PretrainLoader``; records each batch before handing it out."""

    def __init__(self, loader, path: str, sleep: float):
        self.loader, self.sleep = loader, sleep
        self.file = open(path, "a")

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.loader.set_epoch(epoch, start_step)

    def close(self) -> None:
        self.loader.close()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __iter__(self):
        for batch in self.loader:
            record = {"epoch": batch.epoch, "step": batch.step, "ids": batch.sample_ids.tolist()}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            time.sleep(self.sleep)
            yield batch


def main() -> int:
    path, args = sys.argv[1], sys.argv[2:]
    sleep = float(os.environ.get("RECORD_STEP_SLEEP", "0"))
    real_build = trainer.build_loaders

    def build_recording(*a, **k):
        loaders = real_build(*a, **k)
        loaders.train = RecordingLoader(loaders.train, path, sleep)
        return loaders

    trainer.build_loaders = build_recording
    return pretrain.main(args)


if __name__ == "__main__":
    sys.exit(main())
