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
shape, e.g. ``--step-variants @configs/repro_arms/simclr.yaml,@configs/repro_arms/swav.yaml``;
``@FILE+foreach+nosync`` is that overlay's eager step with those switches.

Each variant is compared, window by window, with its reference (``reference_of``):
``@FILE+tokens`` with ``@FILE`` when that is timed too (each objective's switches
against its own step), any other with ``eager`` when timed, else with the first variant.
"""
from __future__ import annotations

import dataclasses

from train.config import (PRECISIONS, PretrainConfig, build_dataclass, config_to_dict, merge_trees,
                          parse_overrides, with_overlay)

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
        split_name(name)
    return names


def split_name(name: str) -> tuple[str | None, list[str]]:
    """``@FILE+foreach`` -> (FILE, [foreach]); ``foreach+nosync`` -> (None, [foreach, nosync]);
    ``config`` and ``@FILE`` have no tokens. Unknown tokens are refused, naming them."""
    overlay = None
    if name.startswith("@"):
        overlay, _, name = name[1:].partition("+")
        if not name:
            return overlay, []
    if name == CONFIG and overlay is None:
        return None, []
    parts = name.split("+")
    unknown = [t for t in parts if t != EAGER and t not in SWITCHES and t not in PRECISIONS]
    if unknown:
        raise ValueError(f"--step-variants: unknown token(s) {', '.join(unknown)} in {name!r}; use {CONFIG}, or "
                         f"{EAGER} and/or {'/'.join(SWITCHES)} and a precision ({'/'.join(PRECISIONS)}) joined by +, "
                         "after @FILE+ or alone")
    return overlay, parts


def reference_of(name: str, names: tuple[str, ...] | list[str]) -> str:
    """The variant that ``name`` is compared with (see the module docstring)."""
    overlay, tokens = split_name(name)
    if overlay is not None and tokens and f"@{overlay}" in names:
        return f"@{overlay}"
    return EAGER if EAGER in names else names[0]


def variant_config(cfg: PretrainConfig, name: str, overrides: tuple[str, ...] = ()) -> PretrainConfig:
    """``cfg`` (or its ``@FILE`` overlay, with the command line's ``overrides`` applied again over
    it: ``--set`` wins over an overlay as over the ``--config`` file) with the ``compute`` section
    (and precision) of variant ``name``."""
    overlay, tokens = split_name(name)
    if overlay is not None:
        cfg = with_overlay(cfg, overlay)
        if overrides:
            cfg = build_dataclass(PretrainConfig, merge_trees(config_to_dict(cfg), parse_overrides(list(overrides))))
    if not tokens:
        return cfg
    compute, precision = dataclasses.replace(cfg.compute, **EAGER_SETTINGS), cfg.run.precision
    for token in tokens:
        if token in PRECISIONS:
            precision = token
        elif token in SWITCHES:
            compute = dataclasses.replace(compute, **SWITCHES[token])
    return dataclasses.replace(cfg, compute=compute, run=dataclasses.replace(cfg.run, precision=precision))


def describe(cfg: PretrainConfig, precision_name: str) -> dict:
    """What a variant row records about the step it timed."""
    c = cfg.compute
    return {"method": cfg.loss.method, "unlabeled_batch_size": cfg.data.unlabeled_batch_size,
            "views_per_image": cfg.views_per_image, "lars_foreach": c.lars_foreach,
            "host_sync": c.host_sync, "compile": c.compile, "cuda_graphs": c.cuda_graphs, "precision": precision_name}
