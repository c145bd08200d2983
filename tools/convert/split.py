"""One split of a conversion: inspect the listed files, choose the labeled subset, write the
sample list, DALI shards and FFCV ``.beton`` under temporary names, then rename them, and
return the split's manifest entry (``tools.convert_imagenet`` drives it split by split)."""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from tqdm import tqdm

from pipelines.format import layout
from pipelines.format.manifest import file_record
from pipelines.image_folder import list_split
from pipelines.labeled import LabeledSubset, match_list, read_list_lines, stratified
from tools.convert.dali_shards import ShardTask, plan_shards, write_shard
from tools.convert.ffcv_beton import BetonSettings, WriterWorkerDied, plan_pages, write_beton
from tools.convert.options import ConversionError, ConvertOptions
from tools.convert.source import SKIP, SourceChanged, Verdict, inspect_file, source_state


class Accepted(NamedTuple):
    """A file that will be written; its position in the split's accepted list is its sample index."""

    source: str  # the file to read: --src / split / path
    path: str  # relative to the split folder
    label: int
    verdict: Verdict


@dataclass
class Inspection:
    accepted: list[Accepted]
    skipped: list[dict]  # {"path", "reason", "detail"}
    seen: int
    empty_classes: list[str]
    source: dict  # source_state of the listed files, to tell a stale conversion on a rerun


def convert_split(split: str, split_dir: Path, out: Path, classes: list[str], options: ConvertOptions, pool) -> dict:
    start = time.perf_counter()
    found = _inspect_split(split, split_dir, classes, options, pool)
    timings = {"inspect": time.perf_counter() - start}
    labeled = _labeled_subset(split, found, options)

    remove_targets(out, split)  # claimed by the caller (claim_targets)
    staged: dict[Path, Path] = {}  # partial name -> final name; renamed once everything is written

    def stage(final: Path) -> Path:
        staged[_partial(final)] = final
        _partial(final).parent.mkdir(parents=True, exist_ok=True)
        return _partial(final)

    try:
        _write_samples(stage(layout.samples_path(out, split)), found.accepted)
        if labeled is not None:
            stage(layout.labeled_path(out, split)).write_text("".join(f"{i}\n" for i in labeled.indices))
        shards: list[dict] = []
        if "dali" in options.formats:
            t = time.perf_counter()
            shards = _write_dali(stage(layout.shard_dir(out, split)), out, split, found.accepted, options, pool)
            timings["dali"] = time.perf_counter() - t
        if "ffcv" in options.formats:
            t = time.perf_counter()
            try:
                settings = BetonSettings(options.max_resolution, options.jpeg_quality, options.compress_probability)
                write_beton(stage(layout.beton_path(out, split)), [(a.source, a.label) for a in found.accepted],
                            settings, plan_pages([a.verdict for a in found.accepted], settings, options.jobs),
                            options.progress)
            except (SourceChanged, WriterWorkerDied) as e:
                raise ConversionError(str(e)) from e
            timings["ffcv"] = time.perf_counter() - t
        for partial, final in staged.items():
            os.replace(partial, final)
    except BaseException:  # a full disk, a dead worker, Ctrl-C: free what was written (ours: claimed)
        remove_targets(out, split)
        raise

    t = time.perf_counter()
    files = [file_record(p, out) for p in _listed_files(staged.values())]
    timings["checksums"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    reencoded = [{"index": i, "path": a.path, "reason": a.verdict.reason}
                 for i, a in enumerate(found.accepted) if a.verdict.reason]
    return {
        "complete": True,
        "counts": {"seen": found.seen, "written": len(found.accepted), "reencoded": len(reencoded),
                   "skipped": len(found.skipped)},
        "skipped": found.skipped,
        "reencoded": reencoded,
        "empty_classes": found.empty_classes,
        "source": found.source,
        "samples_file": layout.samples_path(out, split).relative_to(out).as_posix(),
        "labeled": None if labeled is None else {
            "file": layout.labeled_path(out, split).relative_to(out).as_posix(),
            "count": len(labeled.indices), "missing": labeled.missing, "unavailable": labeled.unavailable,
            "ambiguous": labeled.ambiguous, "duplicates": labeled.duplicates},
        "dali_shards": shards,
        "files": files,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "images_per_second": round(found.seen / timings["total"], 1),
    }


def _inspect_split(split: str, split_dir: Path, classes: list[str], options: ConvertOptions, pool) -> Inspection:
    """List the split and judge every candidate file (in ``pool``); ``--strict`` raises on the first bad one."""
    listing = list_split(split_dir, classes)
    if options.strict and listing.ignored:
        first = listing.ignored[0]
        raise ConversionError(f"--strict: {split_dir / first['path']}: {first['reason']}")
    if options.strict and listing.empty_classes:
        raise ConversionError(f"--strict: {split_dir / listing.empty_classes[0]}: empty-class-folder")

    sources = [str(split_dir / path) for path in listing.paths]
    accepted: list[Accepted] = []
    skipped = list(listing.ignored)
    inspect = functools.partial(inspect_file, max_side=options.max_resolution if "ffcv" in options.formats else None)
    verdicts = _ordered_map(pool, inspect, sources, 64, _bar(options, len(sources), f"{split}: inspect"))
    for path, label, source, verdict in zip(listing.paths, listing.labels, sources, verdicts):
        if verdict.action != SKIP:
            accepted.append(Accepted(source, path, label, verdict))
        elif options.strict:
            raise ConversionError(f"--strict: {source}: {verdict.reason} ({verdict.detail})")
        else:
            skipped.append({"path": path, "reason": verdict.reason, "detail": verdict.detail})
    if not accepted:
        raise ConversionError(f"{split_dir}: no usable image among {len(sources)} candidate files")
    state = source_state(split_dir, listing.paths + [r["path"] for r in listing.ignored])
    return Inspection(accepted, skipped, len(sources) + len(listing.ignored), listing.empty_classes, state)


def _write_samples(path: Path, accepted: list[Accepted]) -> None:
    with open(path, "w") as f:
        for index, a in enumerate(accepted):
            f.write(json.dumps({"index": index, "label": a.label, "path": a.path, "reencode": a.verdict.reason}) + "\n")


def _labeled_subset(split: str, found: Inspection, options: ConvertOptions) -> LabeledSubset | None:
    if split != options.labeled_split:
        return None
    if options.labeled_list is not None:
        lines = read_list_lines(options.labeled_list)
        subset = match_list(lines, [a.path for a in found.accepted], {s["path"]: s["reason"] for s in found.skipped})
        problem = subset.problems()
        if problem and not options.allow_missing:
            raise ConversionError(f"--labeled-list {options.labeled_list} against {split}: {problem}; fix the list, "
                                  "or pass --allow-missing to convert without those entries")
        if not subset.indices:
            raise ConversionError(f"--labeled-list {options.labeled_list} names no usable image of {split}")
        return subset
    if options.labeled_fraction is not None:
        return LabeledSubset(stratified([a.label for a in found.accepted], options.labeled_fraction,
                                        options.seed).tolist())
    return None


def _write_dali(directory: Path, out: Path, split: str, accepted: list[Accepted], options: ConvertOptions,
                pool) -> list[dict]:
    """Write the shards into ``directory``; returns the shard records under their final names."""
    directory.mkdir()
    tasks = [ShardTask(str(directory), shard, r.start, [(a.source, a.label, a.verdict) for a in accepted[r.start:r.stop]],
                       options.jpeg_quality)
             for shard, r in enumerate(plan_shards(len(accepted), options.shard_size, options.shard_multiple))]
    bar = _bar(options, len(accepted), f"{split}: dali shards")
    results = []
    try:
        for result in (pool.imap_unordered(write_shard, tasks) if pool else map(write_shard, tasks)):
            results.append(result)
            bar.update(result["samples"])
    except SourceChanged as e:
        raise ConversionError(str(e)) from e
    finally:
        bar.close()
    final = layout.shard_dir(out, split).relative_to(out)
    return [{"tar": (final / r["tar"]).as_posix(), "idx": (final / r["idx"]).as_posix(),
             "samples": r["samples"], "first_index": r["first_index"]}
            for r in sorted(results, key=lambda r: r["first_index"])]


def _listed_files(finals: Iterable[Path]) -> list[Path]:
    """The given files, with folders replaced by the files they hold."""
    files = []
    for final in finals:
        files.extend(sorted(final.iterdir()) if final.is_dir() else [final])
    return files


def split_targets(out: Path, split: str) -> list[Path]:
    """Every path a conversion of ``split`` writes: its final outputs and their partial names."""
    finals = (layout.samples_path(out, split), layout.labeled_path(out, split),
              layout.shard_dir(out, split), layout.beton_path(out, split))
    return [path for final in finals for path in (final, _partial(final))]


def claim_targets(out: Path, split: str, previous: dict | None) -> list[str]:
    """The paths (relative to ``out``) of ``split_targets``, once each one that exists is known to be
    ours: a partial name (``layout.PARTIAL``, the converter's own suffix), or listed by the split's
    previous manifest entry (``previous``: its written ``files``, or the ``outputs`` an interrupted
    run claimed). Anything else there is someone's file: the conversion is refused naming it, and
    nothing is deleted."""
    previous = previous or {}
    outputs = previous.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(p, str) for p in outputs):
        raise ConversionError(f"{out / layout.MANIFEST}: split {split!r} lists its outputs in an unknown shape; "
                              "move --out's contents away or choose another --out")
    if previous.get("complete") is False and "outputs" not in previous:  # an older converter's interrupted split:
        outputs = [p.relative_to(out).as_posix() for p in split_targets(out, split)]  # it wrote these names
    recorded = {f["path"] for f in previous.get("files", [])} | set(outputs)
    claimed = []
    for path in split_targets(out, split):
        rel = path.relative_to(out).as_posix()
        claimed.append(rel)
        if not os.path.lexists(path) or rel in recorded or rel.endswith(layout.PARTIAL):
            continue
        if path.is_dir() and not path.is_symlink():
            inside = sorted(p for p in path.rglob("*") if not p.is_dir() or p.is_symlink())
            foreign = [p for p in inside if p.relative_to(out).as_posix() not in recorded]
        else:
            foreign = [path]
        if foreign:
            raise ConversionError(f"--out {out} holds {foreign[0]}, which no conversion recorded writing; the converter "
                                  "deletes only files it wrote: move it away, or choose another --out")
    return claimed


def remove_targets(out: Path, split: str) -> None:
    """Delete ``split``'s outputs and partial leftovers (claimed by ``claim_targets`` first)."""
    for path in split_targets(out, split):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _partial(final: Path) -> Path:
    return final.with_name(final.name + layout.PARTIAL)


def _ordered_map(pool, fn: Callable, items: Sequence, chunksize: int, bar: tqdm) -> Iterator:
    """``fn`` over ``items`` in order, in ``pool`` when there is one, advancing ``bar``."""
    results = pool.imap(fn, items, chunksize=chunksize) if pool else map(fn, items)
    try:
        for result in results:
            bar.update(1)
            yield result
    finally:
        bar.close()


def _bar(options: ConvertOptions, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not options.progress, file=sys.stderr)
