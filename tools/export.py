"""Export the pre-trained encoder of any checkpoint: ``python -m tools.export --checkpoint CKPT_OR_RUN_DIR --out FILE``.

Formats: ``torchvision`` (default for torchvision archs), ``timm``, ``safetensors``, ``native``
(the encoder's own keys: the default for other archs); see ``train.export``. Every export gets
a sidecar ``<out>.json`` with its arch, image side, normalisation and labeled-subset rule, which
``train.evaluate`` reads; both files are checked before either is written. Load any export with::

    from train.export import load_encoder
    encoder, info = load_encoder("encoder.pth")  # eval mode; info.transform() prepares an image

Exit status: 0 written, 2 refused (the one-line message says why).
"""
from __future__ import annotations

import argparse
import sys

from pipelines.errors import DataError
from train import checkpoint as ckpt
from train.config import ConfigError
from train.export import (CONFIG_HISTORY_KEY, FORMATS, EncoderInfo, ExportError, check_format, default_format,
                          export_encoder, export_files, load_pretrained)
from train.output_files import check_writable, refuse_existing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a ckpt-*.pt file, or a run directory (its newest checkpoint)")
    p.add_argument("--format", default=None, choices=FORMATS,
                   help="file format of the encoder (default: torchvision for torchvision archs, timm for "
                        "timm/<name>, native otherwise)")
    p.add_argument("--out", required=True,
                   help="file to write, with its sidecar <out>.json (refused if either exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace --out and <out>.json if they exist")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = check_writable(args.out, "--out")
        files = export_files(out)  # the encoder and its sidecar: both checked before either is written
        refuse_existing(files, "--out", "pass --force to replace them, or choose another --out", args.force)
        model, cfg, path, state = load_pretrained(args.checkpoint)
        step = state.get("train_state", {}).get("global_step")
        fmt = args.format or default_format(model.arch)
        check_format(model.arch, fmt)
        export_encoder(model, out, fmt, EncoderInfo.of(cfg, path, step, state.get(CONFIG_HISTORY_KEY)))
    except (ConfigError, DataError, ExportError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the {model.arch} encoder of {path} (global step {step}) as {fmt}: {files[0]} (+ {files[1]}, "
          "its sidecar; load both with train.export.load_encoder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
