"""Manifest bookkeeping: file records with checksums, atomic JSON writes, split completeness."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipelines.atomic_write import write_text_atomically

# 2: webdataset .cls/.idx members in ASCII decimal (1: 4-byte little-endian int32).
FORMAT_VERSION = 2


def file_record(path: Path, out: Path) -> dict:
    """``{"path" (relative to out), "bytes", "sha256"}`` of a written file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": Path(path).relative_to(out).as_posix(), "bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file and a rename (never through a link)."""
    write_text_atomically(path, json.dumps(payload, indent=1) + "\n")


def new_manifest(settings: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "tool": "tools.convert_imagenet", "settings": settings, "splits": {}}


def settings_diff(old: dict, new: dict) -> list[str]:
    """Keys whose values differ, as ``key: old -> new`` lines."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def size_mismatch(out: Path, record: dict) -> tuple[Path, int | None] | None:
    """``(path, size on disk, None when missing)`` if the file of a manifest ``record`` is
    missing or not the size the converter wrote (cheap: no read); None when it matches."""
    path = Path(out) / record["path"]
    if not path.is_file():
        return path, None
    size = path.stat().st_size
    return (path, size) if size != record["bytes"] else None


def record_problem(out: Path, record: dict) -> str | None:
    """Why the file of a manifest ``record`` does not match it (missing, other size, other
    sha256), or None. Reads the whole file."""
    mismatch = size_mismatch(out, record)
    if mismatch is not None:
        path, size = mismatch
        return f"{path}: missing" if size is None else f"{path}: {size} bytes, the converter wrote {record['bytes']}"
    if file_record(Path(out) / record["path"], out)["sha256"] != record["sha256"]:
        return f"{Path(out) / record['path']}: content differs from what the converter wrote (sha256 mismatch)"
    return None


def split_is_complete(entry: dict | None, out: Path) -> bool:
    """True when the entry says complete and every file it lists exists with its recorded size."""
    if not entry or not entry.get("complete"):
        return False
    return all(size_mismatch(out, record) is None for record in entry["files"])
