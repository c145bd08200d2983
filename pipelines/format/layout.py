"""Where a conversion's outputs live inside ``--out``, and readers for its small files.

::

    labels.json                  {"classes": [wnid, ...], "class_to_idx": {wnid: index}}
    manifest.json                settings, per-split counts, skipped files, checksums
    samples/<split>.jsonl        one line per written sample, in sample-index order:
                                 {"index", "label", "path" (relative to the split folder), "reencode"}
    labeled/<split>.txt          labeled subset: one sample index per line, ascending
    ffcv/<split>.beton           fields image (RGBImageField), label, index (IntField)
    dali/<split>/shard-NNNNNN.tar   webdataset: <key>.jpg, <key>.cls, <key>.idx with key = %09d of the index
    dali/<split>/shard-NNNNNN.idx   DALI index (wds2idx "v1.2" format)

A sample's index is its position in the split's written samples, sorted by
class folder then file name (torchvision's ImageFolder order) after the
skipped files are removed; every file above uses that one numbering.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipelines.errors import DataError

MANIFEST = "manifest.json"
LABELS = "labels.json"
PARTIAL = ".partial"  # suffix of outputs being written; renamed when the split completes
FORMAT_DIRS = ("ffcv", "dali")  # a format's folder, named after it; the rest are listings
OUTPUT_DIRS = (*FORMAT_DIRS, "samples", "labeled")  # every folder a conversion writes (above)

# Members of each webdataset sample: JPEG bytes, label, sample index (both ASCII decimal, as
# webdataset writes and reads ``.cls``).
DALI_EXTENSIONS = ("jpg", "cls", "idx")


def encode_int(value: int) -> bytes:
    """A ``.cls`` / ``.idx`` member: ASCII decimal digits."""
    return str(int(value)).encode("ascii")


def decode_int(data) -> int:
    """The value of a ``.cls`` / ``.idx`` member given as bytes or a uint8 array (DALI's ``UINT8``)."""
    return int(bytes(bytearray(data)).decode("ascii"))


def beton_path(out: Path, split: str) -> Path:
    return Path(out) / "ffcv" / f"{split}.beton"


def shard_dir(out: Path, split: str) -> Path:
    return Path(out) / "dali" / split


def format_of(path: str) -> str:
    """What a file of a conversion (``path`` relative to it) belongs to: ``ffcv``, ``dali`` or ``listings``."""
    top = path.split("/", 1)[0]
    return top if top in FORMAT_DIRS else "listings"


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def sample_key(index: int) -> str:
    return f"{index:09d}"


def samples_path(out: Path, split: str) -> Path:
    return Path(out) / "samples" / f"{split}.jsonl"


def labeled_path(out: Path, split: str) -> Path:
    return Path(out) / "labeled" / f"{split}.txt"


def shard_files(out: Path, split: str) -> tuple[list[Path], list[Path]]:
    """The split's DALI shards and their index files, in shard order."""
    tars = sorted(shard_dir(out, split).glob("shard-*.tar"))
    return tars, [t.with_suffix(".idx") for t in tars]


def read_manifest(out: Path) -> dict:
    """The manifest of conversion ``out``; ``DataError`` naming the file when it is
    missing, not JSON, or not shaped like a converter manifest."""
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{Path(out)} holds no {MANIFEST}: not the output of tools.convert_imagenet") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} cannot be read as JSON ({exc}); reconvert the dataset") from exc
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict) or not all(isinstance(e, dict) for e in splits.values()):
        raise DataError(f"{path} is not a converter manifest (expected an object with a \"splits\" object of "
                        f"objects, got {json.dumps(manifest)[:80]}); reconvert the dataset")
    def is_record(f) -> bool:
        return (isinstance(f, dict) and isinstance(f.get("path"), str) and safe_relative(f["path"])
                and isinstance(f.get("bytes"), int) and isinstance(f.get("sha256"), str))

    for split, entry in splits.items():
        files = entry.get("files", [])
        if not isinstance(files, list) or not all(is_record(f) for f in files):
            raise DataError(f"{path}: split {split!r} lists its files in an unknown shape; reconvert the dataset")
    if "labels_file" in manifest and not is_record(manifest["labels_file"]):
        raise DataError(f"{path}: labels_file is not a file record; reconvert the dataset")
    return manifest


def safe_relative(path: str) -> bool:
    """Whether a recorded ``path`` stays inside the conversion (relative, no ``..``)."""
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and ".." not in parts and "\\" not in path and "\0" not in path


def read_classes(out: Path) -> list[str]:
    """Class index -> wnid; ``DataError`` when ``labels.json`` holds no list of names."""
    classes = json.loads((Path(out) / LABELS).read_text())["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{Path(out) / LABELS}: \"classes\" is not a list of class names; reconvert the dataset")
    return classes


def read_samples(out: Path, split: str) -> list[dict]:
    """Sample index -> ``{"index", "label", "path", "reencode"}``."""
    with open(samples_path(out, split)) as f:
        return [json.loads(line) for line in f]


def read_labeled(out: Path, split: str) -> list[int]:
    """Sample indices of the labeled subset."""
    return [int(line) for line in labeled_path(out, split).read_text().split()]

