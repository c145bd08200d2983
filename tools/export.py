"""Export the pre-trained encoder of any checkpoint: ``python -m tools.export --checkpoint CKPT_OR_RUN_DIR --out FILE``.

Formats: ``torchvision`` (default), ``timm``, ``safetensors``; see ``train.export``. Load the
``torchvision`` result with::

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
from train.export import FORMATS, ExportError, export_encoder, load_pretrained


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a ckpt-*.pt file, or a run directory (its newest checkpoint)")
    p.add_argument("--format", default="torchvision", choices=FORMATS, help="file format of the encoder")
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
        export_encoder(model, out, args.format, {"checkpoint": path, "global_step": step})
    except (ConfigError, DataError, ExportError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the {model.arch} encoder of {path} (global step {step}) as {args.format}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
