"""``HANG_AT_STEP=S python -m tests.helpers.hang_run RECORD.jsonl [train.pretrain args]``:
``tests.helpers.record_stream`` with a stream that, before handing out the batch of global step S
(0-based), creates ``RECORD.jsonl.hanging`` and then never returns from one C call
(``time.sleep``), as a step stuck in a collective or on a dead file system does.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tests.helpers import record_stream


class HangingLoader(record_stream.RecordingLoader):
    """Records every batch (``RecordingLoader``), and hangs at global step ``HANG_AT_STEP``."""

    def __init__(self, loader, path: str, sleep: float):
        super().__init__(loader, path, sleep)
        self.marker, self.hang_at = Path(path + ".hanging"), int(os.environ["HANG_AT_STEP"])

    def __iter__(self):
        for batch in super().__iter__():
            if batch.epoch * len(self) + batch.step == self.hang_at:
                self.marker.touch()
                time.sleep(10 ** 6)
            yield batch


if __name__ == "__main__":
    record_stream.RecordingLoader = HangingLoader
    sys.exit(record_stream.main())
