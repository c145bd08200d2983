"""The labeled subset of a split, by sample index: from a list of names or a stratified draw."""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LabeledSubset:
    indices: list[int]  # ascending sample indices
    missing: list[str] = field(default_factory=list)  # listed names found nowhere in the split
    unavailable: list[dict] = field(default_factory=list)  # listed files that were skipped: {"name", "path", "reason"}
    ambiguous: list[str] = field(default_factory=list)  # bare names matching files in several classes
    duplicates: int = 0  # repeated lines


def from_list(lines: list[str], written: list[str], skipped: dict[str, str]) -> LabeledSubset:
    """Match SimCLR-style list entries against the split's files.

    An entry with a ``/`` is a path relative to the split folder
    (``n01440764/n01440764_10026.JPEG``); a bare entry (SimCLR's
    ``10percent.txt``) is matched by file name. ``written`` holds the relative
    path of each written sample in index order; ``skipped`` maps the relative
    path of each skipped file to its reason.
    """
    by_path: dict[str, tuple[int | None, str]] = {p: (i, p) for i, p in enumerate(written)}
    by_path.update({p: (None, p) for p in skipped})
    by_name: dict[str, list[str]] = defaultdict(list)
    for p in by_path:
        by_name[os.path.basename(p)].append(p)

    subset = LabeledSubset(indices=[])
    chosen: set[int] = set()
    seen: set[str] = set()
    for entry in (line.strip() for line in lines):
        if not entry:
            continue
        if entry in seen:
            subset.duplicates += 1
            continue
        seen.add(entry)
        if "/" in entry:
            matches = [entry] if entry in by_path else []
        else:
            matches = by_name.get(entry, [])
        if not matches:
            subset.missing.append(entry)
        elif len(matches) > 1:
            subset.ambiguous.append(entry)
        else:
            index, path = by_path[matches[0]]
            if index is None:
                subset.unavailable.append({"name": entry, "path": path, "reason": skipped[path]})
            else:
                chosen.add(index)
    subset.indices = sorted(chosen)
    return subset


def stratified(labels: list[int], fraction: float, seed: int) -> LabeledSubset:
    """Draw ``max(1, round(fraction * n_c))`` samples of each class with ``n_c`` samples.

    Classes are visited in label order with one ``numpy`` generator seeded by
    ``seed``, so the subset depends only on (sample list, fraction, seed).
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        take = min(len(members), max(1, round(fraction * len(members))))
        chosen.extend(int(i) for i in rng.choice(members, size=take, replace=False))
    return LabeledSubset(indices=sorted(chosen))
