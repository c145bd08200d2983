"""The machine and the package versions a throughput report was measured with."""
from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from train.distributed import DistContext


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def environment(ctx: DistContext) -> dict:
    cpu = {"model": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable_cores()}
    if ctx.device.type == "cuda":
        device = torch.cuda.get_device_name(ctx.device)
    else:
        device = f"{cpu['model']}, {cpu['usable_cores']} of {cpu['logical_cores']} cores"
    try:
        from PIL import features

        jpeg = features.version("libjpeg_turbo") if features.check_feature("libjpeg_turbo") else None
    except Exception:  # old Pillow without version(); the figure is informative only
        jpeg = None
    versions = {
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda if ctx.device.type == "cuda" else None,
        "torchvision": package_version("torchvision"),
        "dali": package_version("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110", "nvidia-dali"),
        "ffcv": package_version("ffcv"), "pillow": package_version("pillow", "Pillow", "pillow-simd"),
        "libjpeg-turbo": jpeg,
    }
    return {"device": device, "device_type": ctx.device.type, "cpu": cpu, "world_size": ctx.world_size,
            "torch_threads": torch.get_num_threads(), "versions": versions}
