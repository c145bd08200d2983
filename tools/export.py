"""Export the pre-trained encoder of any checkpoint: ``python -m tools.export --checkpoint CKPT_OR_RUN_DIR --out FILE``.

Formats: ``torchvision`` (default for torchvision archs), ``timm``, ``safetensors``, ``native``
(the encoder's own keys: the default for other archs); see ``train.export``. Every export gets
a sidecar ``<out>.json`` with its arch, image side, normalisation and labeled-subset rule, which
``train.evaluate`` reads. Load the ``torchvision`` result with::

    model = torchvision.models.resnet50()
    model.load_state_dict(torch.load("encoder.pth", weights_only=True), strict=False)  # only fc.* missing

Exit status: 0 written, 2 refused (the one-line message says why).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.errors import DataError
from train import checkpoint as ckpt
from train.config import ConfigError
from train.export import FORMATS, EncoderInfo, ExportError, default_format, export_encoder, load_pretrained


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a ckpt-*.pt file, or a run directory (its newest checkpoint)")
    p.add_argument("--format", default=None, choices=FORMATS,
                   help="file format of the encoder (default: torchvision for torchvision archs, timm for "
                        "timm/<name>, native otherwise)")
    p.add_argument("--out", required=True, help="file to write (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not args.force:
            raise ExportError(f"--out {out} exists; pass --force to replace it")
        if not out.parent.is_dir():
            raise ExportError(f"--out {out}: folder {out.parent} does not exist")
        model, cfg, path, state = load_pretrained(args.checkpoint)
        step = state.get("train_state", {}).get("global_step")
        fmt = args.format or default_format(model.arch)
        export_encoder(model, out, fmt, EncoderInfo.of(cfg, path, step))
    except (ConfigError, DataError, ExportError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the {model.arch} encoder of {path} (global step {step}) as {fmt}: {out} (+ {out}.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
