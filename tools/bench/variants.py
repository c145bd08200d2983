"""Training-step variants for ``--mode compute --step-variants``.

A variant is ``config`` (the step exactly as the config sets it up, what
training runs) or ``+``-joined tokens applied to the eager step (every
``compute`` switch off): ``foreach`` (multi-tensor LARS), ``nosync`` (no host
sync per step), ``compile`` (torch.compile), ``cudagraphs`` (compile with CUDA
graphs; CUDA only), and a precision (``fp32``, ``bf16``, ``fp16``, ``auto``).
``eager`` alone is the reference the others are compared with, e.g.
``--step-variants eager,foreach,nosync,compile,foreach+nosync+compile``.

A variant ``@FILE`` is the config with the YAML overlay FILE merged over it (its
``_base_`` files too): another objective or shape, each timed at its own batch
shape, against the first variant when there is no ``eager``, e.g.
``--step-variants @configs/repro_arms/simclr.yaml,@configs/repro_arms/swav.yaml``.
"""
from __future__ import annotations

import dataclasses

from train.config import PRECISIONS, PretrainConfig, with_overlay

CONFIG = "config"
EAGER = "eager"
SWITCHES = {
    "foreach": {"lars_foreach": True},
    "nosync": {"host_sync": "log"},
    "compile": {"compile": True},
    "cudagraphs": {"compile": True, "cuda_graphs": True},
}
EAGER_SETTINGS = {"lars_foreach": False, "host_sync": "step", "compile": False, "cuda_graphs": False}


def parse_variants(text: str) -> tuple[str, ...]:
    """Comma-separated variant names, each checked; duplicates dropped, order kept."""
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not names:
        raise ValueError("--step-variants: no variant given")
    for name in names:
        if not name.startswith("@"):
            tokens(name)
    return names


def tokens(name: str) -> list[str]:
    if name == CONFIG or name.startswith("@"):
        return []
    parts = name.split("+")
    unknown = [t for t in parts if t != EAGER and t not in SWITCHES and t not in PRECISIONS]
    if unknown:
        raise ValueError(f"--step-variants: unknown token(s) {', '.join(unknown)} in {name!r}; use {CONFIG}, or "
                         f"{EAGER} and/or {'/'.join(SWITCHES)} and a precision ({'/'.join(PRECISIONS)}) joined by +")
    return parts


def variant_config(cfg: PretrainConfig, name: str) -> PretrainConfig:
    """``cfg`` with the ``compute`` section (and precision) of variant ``name``."""
    if name == CONFIG:
        return cfg
    if name.startswith("@"):
        return with_overlay(cfg, name[1:])
    compute, precision = dataclasses.replace(cfg.compute, **EAGER_SETTINGS), cfg.run.precision
    for token in tokens(name):
        if token in PRECISIONS:
            precision = token
        elif token in SWITCHES:
            compute = dataclasses.replace(compute, **SWITCHES[token])
    return dataclasses.replace(cfg, compute=compute, run=dataclasses.replace(cfg.run, precision=precision))


def describe(cfg: PretrainConfig, precision_name: str) -> dict:
    """What a variant row records about the step it timed."""
    c = cfg.compute
    return {"method": cfg.loss.method, "views_per_image": cfg.views_per_image, "lars_foreach": c.lars_foreach,
            "host_sync": c.host_sync, "compile": c.compile, "cuda_graphs": c.cuda_graphs, "precision": precision_name}
