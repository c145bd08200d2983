"""``python -m tools.throughput``: images/s per GPU of each loader backend and of the training step, and
which one is the bottleneck. The usage and every mode are described in ``tools/bench/cli.py``
(``python -m tools.throughput --help``)."""
from __future__ import annotations

import sys

from tools.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
