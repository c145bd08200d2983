"""The run directory's files read back: ``metrics.csv`` (a resumed run keeps its rows; the kNN
figures, the curves and the summary read them) and ``summary.json`` (a finished run's).

People open metrics.csv in editors and spreadsheets. A row that cannot be read, or a header that
is not metrics.csv's, is refused in one line naming the file, the line and the value, when the
run starts and before it writes anything (``RunDirError``): a resume neither drops the rows it
cannot read nor trains to the end and then fails drawing them. An unreadable summary.json (only
the end of a run writes it) is set aside under a new name, with a note, and written again.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from train.run_lock import RunDirError

METRIC_FIELDS = ("global_step", "epoch", "step", "lr", "loss", "loss_ntxent", "loss_suncet", "loss_swav", "loss_paws",
                 "loss_memax", "images_per_s", "data_wait_frac", "skipped", "bad_images", "knn_top1", "knn_top5",
                 "resumed")
REQUIRED_FIELDS = ("global_step", "epoch")  # every row has them; the others may be empty
COUNT_FIELDS = ("global_step", "epoch", "step", "skipped", "bad_images", "resumed")  # whole numbers >= 0
LOSS_FIELDS = tuple(f for f in METRIC_FIELDS if f.startswith("loss"))
KNN_FIELDS = ("knn_top1", "knn_top5")
_REMEDY = "correct or delete that line, or move the file away to start a new one"


def link_refused(path: Path) -> RunDirError:
    return RunDirError(f"{path} is a symbolic link; remove it (the run never writes through links)")


def _checked_value(path: Path, line: int, key: str, value: str) -> None:
    if value == "" and key not in REQUIRED_FIELDS:
        return
    if key in COUNT_FIELDS:
        if not (value.isascii() and value.isdigit()):
            raise RunDirError(f"{path} line {line}: {key} is {value!r}, not a whole number >= 0; {_REMEDY}")
        return
    try:
        float(value)  # a loss may be nan (a window of skipped steps)
    except ValueError:
        raise RunDirError(f"{path} line {line}: {key} is {value!r}, not a number; {_REMEDY}") from None


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of metrics.csv as written (strings, ``''`` where empty), each checked; an empty list
    when there is no file. ``RunDirError`` names the line of the first row (or the header) that
    cannot be read."""
    if not os.path.lexists(path):
        return []
    if path.is_symlink():
        raise link_refused(path)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        unknown = [name for name in header if name not in METRIC_FIELDS]
        if unknown or len(set(header)) != len(header) or not set(REQUIRED_FIELDS) <= set(header):
            raise RunDirError(f"{path} line 1 is not metrics.csv's header (it reads {','.join(header)[:80]!r}; "
                              f"the columns are {','.join(METRIC_FIELDS)}): restore it, or move the file away to "
                              "start a new one")
        rows = []
        for values in reader:
            if not values:  # a blank line
                continue
            if len(values) != len(header):
                raise RunDirError(f"{path} line {reader.line_num}: {len(values)} values for the header's "
                                  f"{len(header)} columns; {_REMEDY}")
            row = dict(zip(header, values))
            for key, value in row.items():
                _checked_value(path, reader.line_num, key, value)
            rows.append({key: row.get(key, "") for key in METRIC_FIELDS})
    return rows


def series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    """(global steps, values) of the rows that hold ``key``."""
    pairs = [(int(r["global_step"]), float(r[key])) for r in rows if r.get(key)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def knn_of(row: dict[str, str]) -> dict[str, float]:
    return {key: float(row[key]) for key in KNN_FIELDS if row.get(key)}


def set_aside(path: Path, why: str) -> Path:
    """Rename an unreadable run file to ``<name>.unreadable[-N]`` (never over another) and say so."""
    aside = path.with_name(path.name + ".unreadable")
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = path.with_name(f"{path.name}.unreadable-{n}")
    os.rename(path, aside)
    print(f"note: {path} could not be read ({why}); set aside as {aside.name}, a new one is written")
    return aside


def finished_summary(run_dir: Path, global_step: int, may_set_aside: bool) -> dict | None:
    """summary.json when it records the end of this run at ``global_step``; None when there is none,
    or it is of another step, or unreadable (then set aside where ``may_set_aside``: the main rank)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file() or path.is_symlink():
        return None
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict) or not isinstance(summary.get("global_step"), int):
            raise ValueError("not a summary: no global_step")
    except (OSError, ValueError) as exc:
        if may_set_aside:
            set_aside(path, str(exc))
        return None
    return summary if summary["global_step"] == global_step else None

