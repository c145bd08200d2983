"""Pick the compute precision from the device's capability."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later), where
    oneDNN runs bf16 convolutions fast. AVX512-BF16 alone is not enough: on an
    AMD EPYC reporting it, bf16 autocast trained ResNet-18 ~10x slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    autocast_dtype: torch.dtype | None  # None: no autocast (fp32)
    input_dtype: torch.dtype  # dtype the loaders deliver images in
    use_grad_scaler: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.autocast_dtype]


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``auto``: fp16 + GradScaler on CUDA, bf16 on CPUs with AMX, else fp32."""
    if requested == "auto":
        if device.type == "cuda":
            requested = "fp16"
        else:
            requested = "bf16" if cpu_has_native_bf16() else "fp32"
    if requested == "fp32":
        return Precision(None, torch.float32, False)
    if requested == "bf16":
        return Precision(torch.bfloat16, torch.bfloat16 if device.type == "cuda" else torch.float32, False)
    if requested == "fp16":
        if device.type != "cuda":
            raise ValueError("run.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
        return Precision(torch.float16, torch.float16, True)
    raise ValueError(f"run.precision must be auto, fp32, fp16 or bf16, got {requested!r}")
