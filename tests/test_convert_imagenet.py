"""tools/convert_imagenet.py on a tiny generated ImageNet-style tree holding every kind of bad input.

The "unreadable file" is a dangling symlink named like an image: tests run as
root, which reads straight through ``chmod 000``, whereas ``open()`` on a
dangling link fails for any user (``FileNotFoundError`` where a protected
file gives ``PermissionError``; both take the same ``unreadable`` path).
"""
from __future__ import annotations

import hashlib
import io
import math
import logging
import os
import re
import shutil
import sys
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.helpers.imagefolder import make_image_folder, smooth_image
from pipelines.format import layout
from tools.convert.dali_shards import plan_shards
from tools.convert.ffcv_beton import FFCV_MIN_PAGE, JPEG_SLACK, BetonSettings, PagePlan, plan_pages
from pipelines.labeled import stratified
from tools.convert.source import Verdict, load_rgb
from tools.convert_imagenet import ConversionError, ConvertOptions, convert, main

SIZE = (64, 48)  # (width, height) of every image, so FFCV's SimpleRGBImageDecoder can read them all
CLASSES = ["n00000000", "n00000001", "n00000002"]
EMPTY_CLASS = "n00000003"  # train only, and empty
SKIPPED = {  # relative path -> reason
    "README": "outside-class-folder",
    "n00000000/bad_corrupt.JPEG": "corrupt",
    "n00000000/bad_random.JPEG": "not-an-image",
    "n00000000/bad_truncated.JPEG": "truncated",
    "n00000000/notes.txt": "not-an-image-extension",
    "n00000002/unreadable.JPEG": "unreadable",
    "n00000002/zero.JPEG": "empty-file",
}
REENCODED = {
    "n00000001/cmyk.JPEG": "mode:CMYK",
    "n00000001/gray.JPEG": "mode:L",
    "n00000002/png_named.JPEG": "format:PNG",
    "n00000002/rotated.JPEG": "exif-orientation:6",
}
PROGRESSIVE = "n00000001/progressive.JPEG"  # a valid RGB JPEG: copied, not re-encoded
LABELED_LIST = [
    "n00000000_0.JPEG",
    "n00000001/cmyk.JPEG",  # a path relative to the split
    "n00000002_3.JPEG",
    "zero.JPEG",  # exists but skipped
    "n00000009_1.JPEG",  # exists nowhere
    "n00000000_0.JPEG",  # repeated
]
MIN_PSNR_REENCODED = 30.0  # dB, JPEG quality 90 on smooth images
MIN_PSNR_COPIED = 40.0  # dB, same bytes through another libjpeg build


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _jpeg(rgb: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, **save)
    return buf.getvalue()


def build_tree(root: Path) -> None:
    make_image_folder(root / "train", CLASSES, 4, SIZE, seed=0)
    make_image_folder(root / "val", CLASSES, 2, SIZE, seed=1)
    train = root / "train"
    (train / EMPTY_CLASS).mkdir()
    (train / "README").write_text("not a class\n")
    rng = np.random.default_rng(2)
    good = _jpeg(smooth_image(rng, SIZE))
    (train / "n00000000/bad_truncated.JPEG").write_bytes(good[: len(good) // 2])
    (train / "n00000000/bad_random.JPEG").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    corrupt = bytearray(good)
    sos = corrupt.find(b"\xff\xda")
    corrupt[sos + 2:sos + 4] = b"\x00\x02"  # impossible start-of-scan length
    (train / "n00000000/bad_corrupt.JPEG").write_bytes(bytes(corrupt))
    (train / "n00000000/notes.txt").write_text("not an image\n")
    (train / "n00000002/zero.JPEG").write_bytes(b"")
    os.symlink(train / "n00000002/does-not-exist.JPEG", train / "n00000002/unreadable.JPEG")
    Image.fromarray(smooth_image(rng, SIZE)).convert("CMYK").save(train / "n00000001/cmyk.JPEG", format="JPEG", quality=95)
    Image.fromarray(smooth_image(rng, SIZE)).convert("L").save(train / "n00000001/gray.JPEG", format="JPEG", quality=95)
    Image.fromarray(smooth_image(rng, SIZE)).save(train / "n00000002/png_named.JPEG", format="PNG")
    (train / PROGRESSIVE).write_bytes(_jpeg(smooth_image(rng, SIZE), progressive=True))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    (train / "n00000002/rotated.JPEG").write_bytes(_jpeg(smooth_image(rng, SIZE), exif=exif.tobytes()))
    (root / "10percent.txt").write_text("\n".join(LABELED_LIST) + "\n")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    build_tree(root)
    return root


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    options = ConvertOptions(src=str(tree), out=str(out), labeled_list=str(tree / "10percent.txt"),
                             allow_missing=True, shard_size=4, shard_multiple=1, jobs=2, progress=False)
    return SimpleNamespace(src=tree, out=out, options=options, manifest=convert(options))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------
# Manifest, sample list, labels
# ---------------------------------------------------------------------------

def test_manifest_accounts_for_every_file(converted):
    entry = converted.manifest["splits"]["train"]
    counts = entry["counts"]
    on_disk = sum(len(files) for _, _, files in os.walk(converted.src / "train"))
    assert counts["seen"] == on_disk == counts["written"] + counts["skipped"]
    assert {s["path"]: s["reason"] for s in entry["skipped"]} == SKIPPED
    assert {r["path"]: r["reason"] for r in entry["reencoded"]} == REENCODED
    assert counts["reencoded"] == len(REENCODED)
    assert entry["empty_classes"] == [EMPTY_CLASS]
    assert converted.manifest["splits"]["val"]["counts"] == {"seen": 6, "written": 6, "reencoded": 0, "skipped": 0}

    listed = {f["path"] for f in entry["files"]}
    tars, idxs = layout.shard_files(converted.out, "train")
    expected = {"samples/train.jsonl", "labeled/train.txt", "ffcv/train.beton"}
    expected |= {p.relative_to(converted.out).as_posix() for p in tars + idxs}
    assert listed == expected
    for record in entry["files"]:
        path = converted.out / record["path"]
        assert path.stat().st_size == record["bytes"] and _sha256(path) == record["sha256"], record["path"]
    labels = converted.manifest["labels_file"]
    assert labels["path"] == "labels.json" and labels["sha256"] == _sha256(converted.out / "labels.json")
    assert not list(converted.out.rglob("*.partial")) and not list(converted.out.rglob("*.tmp"))


def test_samples_follow_imagefolder_order(converted):
    from torchvision.datasets import ImageFolder

    assert layout.read_classes(converted.out) == CLASSES + [EMPTY_CLASS]
    for split in ("train", "val"):
        samples = layout.read_samples(converted.out, split)
        assert [s["index"] for s in samples] == list(range(len(samples)))
        reference = ImageFolder(str(converted.src / split), allow_empty=True)
        if split == "val":  # the train-only class still gets its index
            assert reference.classes == CLASSES
        else:
            assert reference.classes == CLASSES + [EMPTY_CLASS]
        expected = [(os.path.relpath(p, converted.src / split), y) for p, y in reference.samples]
        expected = [(p, y) for p, y in expected if p not in SKIPPED]
        assert [(s["path"], s["label"]) for s in samples] == expected
        assert {s["path"]: s["reencode"] for s in samples if s["reencode"]} == (REENCODED if split == "train" else {})


def test_labeled_list_matches_names_and_reports_the_rest(converted):
    labeled = converted.manifest["splits"]["train"]["labeled"]
    assert labeled["missing"] == ["n00000009_1.JPEG"]
    assert labeled["unavailable"] == [{"name": "zero.JPEG", "path": "n00000002/zero.JPEG", "reason": "empty-file"}]
    assert labeled["duplicates"] == 1 and labeled["ambiguous"] == []
    samples = layout.read_samples(converted.out, "train")
    indices = layout.read_labeled(converted.out, "train")
    assert indices == sorted(indices) and labeled["count"] == len(indices)
    assert {samples[i]["path"] for i in indices} == {
        "n00000000/n00000000_0.JPEG", "n00000001/cmyk.JPEG", "n00000002/n00000002_3.JPEG"}
    assert "val" not in {k for k, v in converted.manifest["splits"].items() if v["labeled"]}


# ---------------------------------------------------------------------------
# Round trips through the readers the loaders use
# ---------------------------------------------------------------------------

def test_ffcv_round_trip(converted):
    pytest.importorskip("ffcv", reason="pip install .[ffcv]")
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    path = layout.beton_path(converted.out, "train")
    assert Reader(str(path)).field_names == ["image", "label", "index"]
    samples = layout.read_samples(converted.out, "train")
    # The one Loader of this module (each build compiles with numba for 10-30 s).
    loader = Loader(str(path), batch_size=len(samples), num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()], "index": [IntDecoder()]})
    images, labels, indices = (np.concatenate(parts) for parts in zip(*[[np.asarray(x) for x in b] for b in loader]))
    assert indices.ravel().tolist() == list(range(len(samples)))
    assert labels.ravel().tolist() == [s["label"] for s in samples]
    for image, sample in zip(images, samples):
        source = load_rgb(str(converted.src / "train" / sample["path"]))
        assert psnr(image, source) >= MIN_PSNR_REENCODED, sample["path"]


def _read_dali(tars: list[Path], idxs: list[Path], count: int):
    """(raw jpg bytes, decoded RGB, label, index) of every sample, via DALI's CPU webdataset reader."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=count, num_threads=1, device_id=None)
    def pipe():
        jpg, cls, idx = fn.readers.webdataset(
            paths=[str(p) for p in tars], index_paths=[str(p) for p in idxs], ext=list(layout.DALI_EXTENSIONS),
            dtypes=[types.UINT8, types.UINT8, types.UINT8], random_shuffle=False, name="reader")
        return jpg, fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, idx

    p = pipe()
    p.build()
    outs = p.run()
    return [[np.array(out[i]) for out in outs[:2]] + [layout.decode_int(np.array(out[i])) for out in outs[2:]]
            for i in range(count)]


def test_dali_round_trip(converted):
    pytest.importorskip("nvidia.dali", reason="pip install .[dali]")
    samples = layout.read_samples(converted.out, "train")
    tars, idxs = layout.shard_files(converted.out, "train")
    records = _read_dali(tars, idxs, len(samples))
    for i, ((jpg, image, label, index), sample) in enumerate(zip(records, samples)):
        assert index == i and label == sample["label"]
        source_path = converted.src / "train" / sample["path"]
        source = load_rgb(str(source_path))
        if sample["reencode"]:
            assert psnr(image, source) >= MIN_PSNR_REENCODED, sample["path"]
        else:
            assert jpg.tobytes() == source_path.read_bytes(), sample["path"]
            assert psnr(image, source) >= MIN_PSNR_COPIED, sample["path"]
    assert samples[[s["path"] for s in samples].index(PROGRESSIVE)]["reencode"] is None


def test_dali_shards_are_balanced_webdatasets_with_wds2idx_indexes(converted, tmp_path):
    wds2idx = pytest.importorskip("wds2idx", reason="pip install .[dali]")
    shards = converted.manifest["splits"]["train"]["dali_shards"]
    samples = layout.read_samples(converted.out, "train")
    sizes = [s["samples"] for s in shards]
    assert max(sizes) <= 4 and max(sizes) - min(sizes) <= 1
    assert [s["first_index"] for s in shards] == np.cumsum([0] + sizes[:-1]).tolist()
    for shard in shards:
        tar, idx = converted.out / shard["tar"], converted.out / shard["idx"]
        with tarfile.open(tar) as t:
            names = t.getnames()
        keys = [f"{i:09d}" for i in range(shard["first_index"], shard["first_index"] + shard["samples"])]
        assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "cls", "idx")]
        with tarfile.open(tar) as t:  # webdataset's convention: .cls holds the label as ASCII digits
            for k, i in zip(keys, range(shard["first_index"], shard["first_index"] + shard["samples"])):
                assert int(t.extractfile(f"{k}.cls").read().decode("ascii")) == samples[i]["label"]
                assert t.extractfile(f"{k}.idx").read() == str(i).encode()
        with wds2idx.IndexCreator(str(tar), str(tmp_path / "ref.idx"), verbose=False) as creator:
            creator.create_index()
        assert idx.read_text() == (tmp_path / "ref.idx").read_text()


def test_plan_shards_balances_and_rounds_to_the_multiple():
    shards = plan_shards(1000, shard_size=64, shard_multiple=8)
    assert len(shards) == 16 and {len(r) for r in shards} <= {62, 63}
    assert [i for r in shards for i in r] == list(range(1000))
    assert plan_shards(0, 64, 8) == []


def test_plan_shards_on_small_splits_keeps_shards_at_least_half_full():
    assert len(plan_shards(1000, 1024, 64)) == 1  # issue 35: was 64 shards of 15 images
    assert len(plan_shards(3925, 1024, 64)) == 4  # Imagenette's val: 4 x 981, not 64 x 61
    assert len(plan_shards(1_281_167, 1024, 64)) == 1280  # ImageNet's train and val: rounded to 64 as before
    assert len(plan_shards(50_000, 1024, 64)) == 64
    for n, size, multiple in [(n, s, m) for n in (1, 5, 17, 100, 999, 4097) for s in (1, 2, 7, 64)
                              for m in (1, 3, 8, 12, 64)]:
        shards = plan_shards(n, size, multiple)
        lengths = [len(r) for r in shards]
        assert [i for r in shards for i in r] == list(range(n)), (n, size, multiple)
        assert max(lengths) <= size and max(lengths) - min(lengths) <= 1 and min(lengths) >= 1
        # brute force: the fewest shards sharing the largest factor with the multiple, among the counts
        # that keep shards at least half full (the fewest shards possible when none does)
        least = math.ceil(n / size)
        fitting = [c for c in range(least, n + 1) if n // c >= max(1, size // 2)] or [least]
        expected = min(fitting, key=lambda c: (-math.gcd(c, multiple), c))
        assert len(shards) == expected, (n, size, multiple)


# ---------------------------------------------------------------------------
# Labeled fraction, command line, FFCV resizing
# ---------------------------------------------------------------------------

def test_cli_fraction_draw_is_class_stratified(tree, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--src", str(tree), "--out", str(out), "--splits", "train", "--labeled-fraction", "0.5", "--seed", "3",
            "--max-resolution", "32", "--shard-size", "4", "--shard-multiple", "2", "--jobs", "2", "--no-progress"]
    assert main(argv) == 0
    assert "17/17" not in capsys.readouterr().err  # --no-progress also silences FFCV's own writer bar
    samples = layout.read_samples(out, "train")
    per_class = Counter(s["label"] for s in samples)
    drawn = Counter(samples[i]["label"] for i in layout.read_labeled(out, "train"))
    assert drawn == {c: max(1, round(0.5 * n)) for c, n in per_class.items()}
    assert len(layout.shard_files(out, "train")[0]) == 6  # ceil(17 / 4) = 5, rounded up to a multiple of 2

    from ffcv.reader import Reader

    meta = Reader(str(layout.beton_path(out, "train"))).metadata["f0"]
    assert max(meta["width"].max(), meta["height"].max()) == 32  # 64x48 sources, longest side now 32
    assert main(argv) == 0  # a rerun with the same settings finds the split complete


def test_a_small_beton_is_its_samples_and_at_most_a_header_page_and_a_last_page(tmp_path):
    """Issue 35: 1,000 CIFAR-sized images made a 25 MB .beton (three 8 MiB pages: the header's and
    one per writer worker) for 2 MB of samples. The bound here is FFCV's smallest page, twice."""
    pytest.importorskip("ffcv", reason="pip install .[ffcv]")
    from ffcv.reader import Reader

    src, out = tmp_path / "src", tmp_path / "out"
    make_image_folder(src / "train", 4, 50, 32, seed=0)
    convert(ConvertOptions(src=str(src), out=str(out), splits=("train",), formats=("ffcv",), jobs=2, progress=False))
    beton = layout.beton_path(out, "train")
    reader = Reader(str(beton))
    stored = int(reader.alloc_table["size"].sum())  # the bytes of every sample's image, as FFCV reads them
    assert beton.stat().st_size <= stored + reader.alloc_table.nbytes + 2 * FFCV_MIN_PAGE
    assert reader.metadata["f2"].tolist() == list(range(200))  # still FFCV-readable, indices in order
    assert reader.metadata["f1"].tolist() == [s["label"] for s in layout.read_samples(out, "train")]


def _verdicts(count: int, size: tuple[int, int], nbytes: int) -> list[Verdict]:
    return [Verdict("copy", nbytes=nbytes, size=size)] * count


def test_beton_pages_fit_eight_of_the_largest_samples_and_workers_eight_pages_each():
    settings = BetonSettings(max_resolution=512, jpeg_quality=90, compress_probability=0.5)
    imagenet = plan_pages(_verdicts(1_281_167, (500, 375), 110_000), settings, jobs=32)
    assert imagenet == PagePlan(8 << 20, 32)  # 562,500-byte raw images: 8 x 566,596 needs 8 MiB; ~430 GB of data
    assert plan_pages(_verdicts(1000, (32, 32), 1000), settings, jobs=2) == PagePlan(FFCV_MIN_PAGE, 1)
    for size, resolution in [((4000, 3000), 512), ((4000, 3000), 1024), ((300, 4000), 2048), ((64, 48), 64)]:
        plan = plan_pages(_verdicts(10, size, 10_000), BetonSettings(resolution, 90, 0.5), jobs=4)
        # FFCV's resize, written out: the long side to the resolution, the short side truncated
        long, short = max(size), min(size)
        raw = 3 * min(long, resolution) * (short * resolution // long if long > resolution else short)
        need = 8 * (raw + JPEG_SLACK)
        assert plan.page_size >= max(need, FFCV_MIN_PAGE) and (plan.page_size == FFCV_MIN_PAGE
                                                               or plan.page_size // 2 < need), (size, resolution)
        assert plan.page_size & (plan.page_size - 1) == 0 and plan.workers == 1  # 10 images: one worker
    all_jpeg = BetonSettings(512, 90, 1.0)  # the expected data counts the source's JPEG bytes
    assert plan_pages(_verdicts(4000, (500, 375), 110_000), all_jpeg, jobs=64).workers == 4000 * 110_000 // (64 << 20)


UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def _near(text: str, nbytes: int) -> bool:
    """``text`` (``12.3 kB``) is ``nbytes`` rounded to its last digit."""
    value, unit = text.split()
    step = UNITS[unit] * (1 if unit == "B" else 0.1)
    return abs(float(value) * UNITS[unit] - nbytes) <= step / 2 + 1e-9


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name != ".convert.lock")


def test_last_line_names_the_output_folder_and_its_bytes_per_format_and_split(converted, caplog):
    out = converted.out  # a rerun finds both splits complete, and still ends with the line
    with caplog.at_level(logging.INFO, logger="tools.convert_imagenet"):
        assert main(["--src", str(converted.src), "--out", str(out), "--labeled-list", converted.options.labeled_list,
                     "--allow-missing", "--shard-size", "4", "--shard-multiple", "1", "--jobs", "2",
                     "--no-progress"]) == 0
    assert "already converted" in caplog.records[0].getMessage()
    last = caplog.records[-1].getMessage()
    size = r"(\d+(?:\.\d)? [kMG]?B)"
    found = re.fullmatch(rf"output: (\S+) \({size}; pass this folder as data.root\): ffcv {size} \(train {size}, "
                         rf"val {size}\), dali {size} \(train {size} in (\d+) shards?, val {size} in (\d+) shards?\), "
                         rf"listings {size}", last)
    assert found, last
    (folder, total, ffcv, ffcv_train, ffcv_val, dali, dali_train, train_shards, dali_val, val_shards,
     listings) = found.groups()
    assert folder == str(out) and _near(total, _bytes_under(out))
    assert _near(ffcv_train, layout.beton_path(out, "train").stat().st_size)
    assert _near(ffcv_val, layout.beton_path(out, "val").stat().st_size) and _near(ffcv, _bytes_under(out / "ffcv"))
    assert _near(dali_train, _bytes_under(layout.shard_dir(out, "train")))
    assert _near(dali_val, _bytes_under(layout.shard_dir(out, "val"))) and _near(dali, _bytes_under(out / "dali"))
    assert int(train_shards) == len(layout.shard_files(out, "train")[0])
    assert int(val_shards) == len(layout.shard_files(out, "val")[0])
    assert _near(listings, _bytes_under(out) - _bytes_under(out / "ffcv") - _bytes_under(out / "dali"))


def test_stratified_draw_counts_and_seed():
    labels = [0] * 10 + [1] * 3 + [2] * 1 + [3] * 7
    subset = stratified(labels, 0.3, seed=0).tolist()
    assert Counter(labels[i] for i in subset) == {0: 3, 1: 1, 2: 1, 3: 2}
    assert stratified(labels, 0.3, seed=0).tolist() == subset
    assert any(stratified(labels, 0.3, seed=s).tolist() != subset for s in range(1, 5))


# ---------------------------------------------------------------------------
# Strictness, restarts, settings conflicts, missing pieces
# ---------------------------------------------------------------------------

def test_strict_stops_at_the_first_bad_file(tmp_path):
    src = tmp_path / "src"
    make_image_folder(src / "train", 1, 2, SIZE, seed=0)
    (src / "train/n00000000/n00000000_9.JPEG").write_bytes(_jpeg(smooth_image(np.random.default_rng(0), SIZE))[:300])
    options = dict(src=str(src), splits=("train",), formats=("dali",), jobs=1, progress=False)
    with pytest.raises(ConversionError, match=r"--strict: .*n00000000_9\.JPEG: truncated"):
        convert(ConvertOptions(out=str(tmp_path / "strict"), strict=True, **options))
    manifest = convert(ConvertOptions(out=str(tmp_path / "lenient"), **options))
    assert manifest["splits"]["train"]["counts"] == {"seen": 3, "written": 2, "reencoded": 0, "skipped": 1}


@pytest.mark.timeout(60)
def test_ffcv_write_failure_fails_the_split_instead_of_hanging(tmp_path, monkeypatch):
    pytest.importorskip("ffcv", reason="pip install .[ffcv]")
    src = tmp_path / "src"
    make_image_folder(src / "train", 1, 2, SIZE, seed=0)
    from tools.convert import ffcv_beton
    real_load = ffcv_beton.load_rgb

    def load_rgb(path):  # the file fails between inspection and writing (FFCV's workers would wait forever)
        if path.endswith("_1.JPEG"):
            raise OSError("gone")
        return real_load(path)

    monkeypatch.setattr(ffcv_beton, "load_rgb", load_rgb)
    with pytest.raises(ConversionError, match=r"_1\.JPEG\tOSError: gone"):
        convert(ConvertOptions(src=str(src), out=str(tmp_path / "out"), splits=("train",), formats=("ffcv",),
                               jobs=1, progress=False))
    assert not layout.beton_path(tmp_path / "out", "train").exists()


def test_a_labeled_list_naming_absent_files_is_refused_unless_allowed(tree, tmp_path):
    options = ConvertOptions(src=str(tree), out=str(tmp_path / "out"), splits=("val",), formats=("dali",),
                             labeled_list=str(tree / "10percent.txt"), labeled_split="val", jobs=1, progress=False)
    with pytest.raises(ConversionError, match="against val: .* not in the split: .*n00000001/cmyk.JPEG"):
        convert(options)
    assert not layout.shard_dir(tmp_path / "out", "val").exists()
    code = main(["--src", str(tree), "--out", str(tmp_path / "out2"), "--splits", "train", "--formats", "dali",
                 "--labeled-list", str(tree / "10percent.txt"), "--jobs", "1", "--no-progress"])
    assert code != 0  # the train split's list names a missing and an unreadable file
    assert main(["--src", str(tree), "--out", str(tmp_path / "out2"), "--splits", "train", "--formats", "dali",
                 "--labeled-list", str(tree / "10percent.txt"), "--jobs", "1", "--no-progress",
                 "--allow-missing"]) == 0


def test_rerun_skips_complete_splits(converted):
    beton = layout.beton_path(converted.out, "train")
    before = beton.stat().st_mtime_ns
    assert convert(converted.options) == converted.manifest
    assert beton.stat().st_mtime_ns == before


def test_interrupted_split_is_redone_and_other_settings_refused(tree, tmp_path):
    out = tmp_path / "out"
    options = dict(src=str(tree), out=str(out), splits=("val",), formats=("dali",), shard_size=2, shard_multiple=1,
                   jobs=1, progress=False)
    first = convert(ConvertOptions(**options))
    (out / "dali/val/shard-000001.tar").unlink()  # a lost output ...
    (out / "dali/val.partial").mkdir()  # ... and the leftovers of an interrupted write
    (out / "dali/val.partial/shard-000000.tar").write_bytes(b"half")
    second = convert(ConvertOptions(**options))
    assert second["splits"]["val"]["files"] == first["splits"]["val"]["files"]  # shards are byte-reproducible
    assert not (out / "dali/val.partial").exists()

    with pytest.raises(ConversionError, match="other settings.*--overwrite(.|\n)*shard_size"):
        convert(ConvertOptions(**{**options, "shard_size": 3}))
    third = convert(ConvertOptions(**{**options, "shard_size": 3}, overwrite=True))
    assert len(third["splits"]["val"]["dali_shards"]) == 2


def test_missing_src_and_split_fail_clearly(tree, tmp_path, capsys):
    assert main(["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(ConversionError, match=r"no folder for split\(s\) \['test'\]"):
        convert(ConvertOptions(src=str(tree), out=str(tmp_path / "out"), splits=("test",)))


def test_missing_ffcv_names_the_extra(tree, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # makes `import ffcv` raise ImportError
    with pytest.raises(ConversionError, match=r"pip install \.\[ffcv\]"):
        convert(ConvertOptions(src=str(tree), out=str(tmp_path / "out"), splits=("val",)))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Real ImageNet files (Imagenette), when the shared data is present
# ---------------------------------------------------------------------------

IMAGENETTE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette2-224.tar"


@pytest.mark.slow
@pytest.mark.skipif(not IMAGENETTE.exists(), reason="needs ../shared/data/imagenette2-224.tar")
def test_imagenette_conversion(tmp_path):
    with tarfile.open(IMAGENETTE) as t:
        t.extractall(tmp_path, filter="data")
    out = tmp_path / "out"
    try:
        manifest = convert(ConvertOptions(src=str(tmp_path / "imagenette2"), out=str(out), labeled_fraction=0.1,
                                          jobs=2, progress=False))
    finally:  # ~1.5 GB; pytest keeps its last temporary folders
        shutil.rmtree(tmp_path)
    counts = {s: e["counts"] for s, e in manifest["splits"].items()}
    assert counts["train"] == {"seen": 9469, "written": 9469, "reencoded": 173, "skipped": 0}
    assert counts["val"] == {"seen": 3925, "written": 3925, "reencoded": 69, "skipped": 0}
    reasons = {r["reason"] for e in manifest["splits"].values() for r in e["reencoded"]}
    assert reasons == {"mode:L"}  # the 242 single-channel JPEGs
    assert len(manifest["splits"]["val"]["dali_shards"]) == 4  # 3925 images: 4 shards of 981 (plan_shards)


def test_verify_converted_finds_edited_and_truncated_files(converted, tmp_path, capsys):
    import shutil

    from tools import verify_converted

    copy = tmp_path / "out"
    shutil.copytree(converted.out, copy)
    assert verify_converted.main([str(copy)]) == 0
    assert capsys.readouterr().out.startswith("ok:")
    beton = layout.beton_path(copy, "train")
    data = bytearray(beton.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    beton.write_bytes(bytes(data))
    shard = sorted(layout.shard_files(copy, "val")[0])[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert verify_converted.main([str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"{beton}: content differs" in out and f"{shard}: " in out and "bytes, the converter wrote" in out
    assert verify_converted.main([str(copy), "--splits", "train"]) == 1
    assert str(shard) not in capsys.readouterr().out
    assert verify_converted.main([str(tmp_path / "nothing")]) == 2
