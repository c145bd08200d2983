"""The labeled subset of a split: one list parser, one stratified draw, one precedence rule.

Used by the converter (which stores the subset in ``labeled/<split>.txt``) and
by every loader and evaluation, so that the same list or seed selects the
same images everywhere.

List format (SimCLR's ``10percent.txt``): UTF-8 text (a byte-order mark is
allowed), one entry per line; blank lines are ignored, and so are lines
starting with ``#``, unless the whole line names an image of the split (a
file may be called ``#1.JPEG``). An entry with a ``/`` is a path
relative to the split folder (``n01440764/n01440764_10026.JPEG``); a bare
entry is a file name, matched against the file names of the split. A bare
name found in several folders is *ambiguous*, an entry found nowhere is
*missing*; both are refused by the loaders, and by the converter unless it is
told to allow them. A ``class/file`` entry whose file exists only in another
class is missing, never matched by its bare name.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipelines.errors import DataError


@dataclass
class LabeledSubset:
    indices: list[int]  # ascending sample indices
    missing: list[str] = field(default_factory=list)  # listed names found nowhere in the split
    unavailable: list[dict] = field(default_factory=list)  # listed files the converter skipped: {"name", "path", "reason"}
    ambiguous: list[str] = field(default_factory=list)  # bare names matching files in several folders
    duplicates: int = 0  # repeated lines

    def problems(self) -> str | None:
        """One line naming what the list got wrong, or None when every entry matched once."""
        parts = []
        for label, names in (("not in the split", self.missing),
                             ("ambiguous (a file name present in several class folders; write <class>/<file>)",
                              self.ambiguous),
                             ("skipped as unreadable", [u["name"] for u in self.unavailable])):
            if names:
                shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
                parts.append(f"{len(names)} {label}: {shown}")
        return "; ".join(parts) or None


def read_list_lines(list_file: str | os.PathLike) -> list[str]:
    """The lines of a labeled list, decoded as UTF-8 (a leading byte-order mark dropped);
    ``DataError`` naming the file and the line for anything else."""
    list_file = Path(list_file)
    try:
        data = list_file.read_bytes()
    except OSError as exc:
        raise DataError(f"labeled-subset file {list_file} cannot be read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"labeled-subset file {list_file} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line "
                        f"{line}); save it as UTF-8") from None


def list_entries(lines: Sequence[str], names: set[str] = frozenset()) -> list[str]:
    """The entries of a labeled list: stripped, without blank lines, and without ``#`` lines
    that are not in ``names`` (the split's relative paths and file names)."""
    entries = (line.strip() for line in lines)
    return [e for e in entries if e and (not e.startswith("#") or e.replace(os.sep, "/") in names)]


def match_list(lines: Sequence[str], paths: Sequence[str], skipped: dict[str, str] | None = None) -> LabeledSubset:
    """Match list ``lines`` against a split's sample ``paths`` (relative, index order).

    ``skipped`` maps the relative path of each file left out of ``paths`` (by
    the converter) to its reason, so that a listed but unreadable file is
    reported as such rather than as missing."""
    skipped = skipped or {}
    by_path: dict[str, int | None] = {p: i for i, p in enumerate(paths)}
    by_path.update({p: None for p in skipped})
    by_name: dict[str, list[str]] = defaultdict(list)
    for p in by_path:
        by_name[p.rsplit("/", 1)[-1]].append(p)

    subset = LabeledSubset(indices=[])
    chosen: set[int] = set()
    seen: set[str] = set()
    for entry in list_entries(lines, set(by_path) | set(by_name)):
        entry = entry.replace(os.sep, "/")
        if entry in seen:
            subset.duplicates += 1
            continue
        seen.add(entry)
        matches = ([entry] if entry in by_path else []) if "/" in entry else by_name.get(entry, [])
        if not matches:
            subset.missing.append(entry)
        elif len(matches) > 1:
            subset.ambiguous.append(entry)
        elif by_path[matches[0]] is None:
            subset.unavailable.append({"name": entry, "path": matches[0], "reason": skipped[matches[0]]})
        else:
            chosen.add(by_path[matches[0]])
    subset.indices = sorted(chosen)
    return subset


def stratified(labels: Sequence[int] | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Draw ``max(1, round(fraction * n_c))`` samples of each class with ``n_c`` samples.

    Classes are visited in label order with one numpy generator seeded by
    ``seed``, so the subset depends only on (labels, fraction, seed). Returns
    ascending int64 sample indices."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = min(len(members), max(1, int(round(fraction * len(members)))))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def read_list(list_file: str | os.PathLike, paths: Sequence[str], where: str) -> np.ndarray:
    """The sample indices ``list_file`` names among ``paths``; any missing or ambiguous
    entry, or a list naming nothing, is a ``DataError`` naming them (``where``: the split)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"labeled-subset file not found: {list_file}")
    subset = match_list(read_list_lines(list_file), paths)
    problem = subset.problems()
    if problem:
        raise DataError(f"labeled-subset file {list_file} against {where}: {problem}")
    if not subset.indices:
        raise DataError(f"labeled-subset file {list_file} names no images")
    return np.asarray(subset.indices, dtype=np.int64)


@dataclass(frozen=True)
class LabeledSpec:
    """How a run chooses its labeled subset (``data.labeled_list`` / ``labeled_fraction``, ``run.seed``)."""

    list_file: str | None
    fraction: float
    seed: int


def choose_labeled(spec: LabeledSpec, paths: Sequence[str], labels: np.ndarray, where: str,
                   converted: np.ndarray | None = None) -> np.ndarray:
    """The precedence rule: ``spec.list_file`` if set, else the converter's subset
    (``converted``) if there is one, else a stratified draw of ``spec.fraction``
    (at least one image per class) with ``spec.seed``."""
    if spec.list_file:
        chosen = read_list(spec.list_file, paths, where)
    elif converted is not None:
        chosen = np.asarray(converted, dtype=np.int64)
    else:
        chosen = stratified(labels, spec.fraction, spec.seed)
    if len(chosen) == 0:
        raise DataError(f"the labeled subset of {where} is empty")
    return chosen
