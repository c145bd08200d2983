"""Result rows, figures, verdict and output formats of ``tools.throughput``.

Pure functions of measured timings: no torch, no device, so the verdict and
the report layout can be tested on synthetic numbers.

A result row (one per mode and backend) is a plain dict, the unit of the JSON
report::

    {"mode": "loader", "backend": "torch", "status": "ok" | "unavailable" | "error",
     "reason": None | str,
     "figures": {"images_per_s": SPREAD, "views_per_s": SPREAD, ...,   # per GPU / process
                 "cpu_cores_used": float, "images_per_s_per_core": float,
                 "peak_rss_mb": float, "steps": int},
     "ranks": [FIGURES, ...],          # one per rank, only under torchrun
     "aggregate": {"images_per_s": float, ...},  # sum over ranks of the medians
     "vs_torch": float | None,         # images_per_s / the torch row's, same mode
     "vs_pil": float | None,           # images_per_s / the PIL baseline's (pil-reference), same mode
     "vs_decode": float | None}        # loader decodes_per_s / the decode ceiling

where ``SPREAD`` is ``{"median", "min", "max", "windows": [...]}`` over the
timed windows (see ``Spread``). A ``compute`` row also names its step
``variant`` (``config`` unless ``--step-variants`` says otherwise) and the
``settings`` it ran with, and, with several variants, ``vs_eager``: the SPREAD
of its images/s over the reference variant's (``eager`` when timed, else the
first variant: e.g. SimCLR's step against other objectives'), window by window
(the variants are timed in turns, so window i of each saw the same moment of the
machine); ``reference`` names that variant.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

# Fraction of step time spent waiting for data above which a run is loader-bound.
# Below it the wait is the unavoidable hand-over of a prefetched batch.
LOADER_BOUND_WAIT = 0.10

BACKEND_NAMES = ("torch", "dali", "ffcv")
BASELINE = "pil-reference"  # the loader users run today (tools/bench/pil_reference.py)

# What the main figure counts, by mode.
FIGURE_NOTE = ("main figure: loader/compute/e2e = unlabeled images/s (each gives the shape's views; views/s adds "
               "the support); decode = images decoded/s; augment = views augmented/s")

SUMMED_KEYS = ("images_per_s", "views_per_s", "decodes_per_s", "cpu_cores_used", "peak_rss_mb")


@dataclass(frozen=True)
class Spread:
    """A figure over the timed windows: median, min, max and every window's value."""

    median: float
    min: float
    max: float
    windows: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        values = tuple(float(v) for v in values)
        if not values:
            raise ValueError("a spread needs at least one window")
        return cls(statistics.median(values), min(values), max(values), values)

    @classmethod
    def from_dict(cls, d: dict) -> Spread:
        return cls(d["median"], d["min"], d["max"], tuple(d["windows"]))

    @classmethod
    def mean_over_ranks(cls, spreads: Sequence[Spread]) -> Spread:
        """Per-GPU figure of several ranks: the mean of their medians (and of
        each window), the lowest min and the highest max."""
        n = len(spreads)
        windows = tuple(sum(w) / n for w in zip(*(s.windows for s in spreads)))
        return cls(sum(s.median for s in spreads) / n, min(s.min for s in spreads),
                   max(s.max for s in spreads), windows)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["windows"] = list(self.windows)
        return d


def rates(counts: Sequence[float], seconds: Sequence[float]) -> Spread:
    """Per-window rate ``count / seconds``."""
    return Spread.of(c / s for c, s in zip(counts, seconds))


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Verdict:
    bound: str  # "loader" or "compute"
    factor: float | None  # how much the other side has to spare (>= 1), None when unknown
    text: str


def _fed_slowdown(wait_frac: float, e2e_ips: float, compute_ips: float | None, tolerance: float = 1.2) -> str:
    """A note when the step itself (wait excluded) ran much slower fed by the
    loader than on synthetic batches: the two compete for something."""
    if compute_ips is None or e2e_ips <= 0:
        return ""
    slowdown = compute_ips * (1.0 - wait_frac) / e2e_ips
    if slowdown < tolerance:
        return ""
    return (f"; the step itself ran {slowdown:.2f}x slower fed by the loader than on synthetic batches "
            "(loader and step compete for CPU cores, memory bandwidth or host-to-device copies)")


def verdict(wait_frac: float | None = None, e2e_ips: float | None = None, loader_ips: float | None = None,
            compute_ips: float | None = None, threshold: float = LOADER_BOUND_WAIT) -> Verdict | None:
    """Loader-bound or compute-bound, and by how much.

    With an end-to-end run (``wait_frac``, the fraction of step time spent in
    ``next(loader)``, and ``e2e_ips``) the measured wait decides: at or above
    ``threshold`` the run is loader-bound and the factor is the speed-up with
    data always ready, ``1 / (1 - wait_frac)``; below it the run is
    compute-bound and the factor is the loader's headroom, ``loader_ips /
    e2e_ips`` (None without a loader-only figure). Without an end-to-end run
    the isolated loader-only and compute-only figures decide, the factor being
    the faster over the slower. The isolated figures (same units: unlabeled
    images/s per GPU) are quoted when present, and a fed step (wait excluded)
    more than 1.2x slower than the compute-only step is pointed out. Returns
    None when neither source is available.
    """
    isolated = ""
    if loader_ips is not None and compute_ips is not None:
        isolated = f" (isolated: loader {loader_ips:.1f} img/s, compute {compute_ips:.1f} img/s)"
    if wait_frac is not None and e2e_ips is not None:
        isolated += _fed_slowdown(wait_frac, e2e_ips, compute_ips)
        if wait_frac >= threshold:
            factor = 1.0 / max(1.0 - wait_frac, 1e-9)
            return Verdict("loader", factor, f"loader-bound: {100 * wait_frac:.0f}% of step time waits for data; "
                                             f"with data always ready steps would run {factor:.2f}x faster{isolated}")
        factor = loader_ips / e2e_ips if loader_ips is not None and e2e_ips > 0 else None
        spare = f"; the loader alone delivers {factor:.2f}x what training consumes" if factor is not None else ""
        return Verdict("compute", factor,
                       f"compute-bound: {100 * wait_frac:.0f}% of step time waits for data{spare}{isolated}")
    if loader_ips is not None and compute_ips is not None and min(loader_ips, compute_ips) > 0:
        if loader_ips < compute_ips:
            factor = compute_ips / loader_ips
            return Verdict("loader", factor, f"loader-bound (isolated figures, no e2e run): compute could train "
                                             f"{factor:.2f}x what the loader delivers{isolated}")
        factor = loader_ips / compute_ips
        return Verdict("compute", factor, f"compute-bound (isolated figures, no e2e run): the loader delivers "
                                          f"{factor:.2f}x what compute trains{isolated}")
    return None


# --------------------------------------------------------------------------- rows


def ok_row(mode: str, backend: str, figures: dict, **extra) -> dict:
    return {"mode": mode, "backend": backend, "status": "ok", "reason": None, "figures": figures, **extra}


def short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def failure_row(mode: str, backend: str, exc: BaseException, **extra) -> dict:
    """``unavailable`` for a missing optional module (ImportError), ``error`` for anything else."""
    status = "unavailable" if isinstance(exc, ImportError) else "error"
    return {"mode": mode, "backend": backend, "status": status, "reason": short_reason(exc), **extra}


def combine_ranks(per_rank: Sequence[dict]) -> tuple[dict, dict]:
    """Per-GPU figures (mean over ranks) and the aggregate (sum over ranks of
    medians and resources) of one row's per-rank figures."""
    first = per_rank[0]
    figures: dict = {}
    aggregate: dict = {}
    for key, value in first.items():
        values = [r[key] for r in per_rank]
        if any(v is None for v in values):
            figures[key] = None
        elif isinstance(value, dict):
            figures[key] = Spread.mean_over_ranks([Spread.from_dict(v) for v in values]).as_dict()
        elif isinstance(value, int) and len(set(values)) == 1:  # counts such as steps
            figures[key] = value
        elif isinstance(value, (int, float)):
            figures[key] = sum(values) / len(values)
        else:
            figures[key] = value
        if key in SUMMED_KEYS and figures[key] is not None:
            aggregate[key] = sum(v["median"] if isinstance(v, dict) else v for v in values)
    return figures, aggregate


def median(row: dict, key: str = "images_per_s") -> float | None:
    if row.get("status") != "ok":
        return None
    value = row["figures"].get(key)
    return value["median"] if isinstance(value, dict) else value


def compute_reference(rows: Sequence[dict]) -> dict | None:
    """The compute row that stands for the training run: variant ``config``, else the first."""
    compute = [r for r in rows if r["mode"] == "compute"]
    return next((r for r in compute if r.get("variant", "config") == "config"), compute[0] if compute else None)


def add_ratios(rows: list[dict]) -> None:
    """Fill ``vs_torch`` and ``vs_pil`` (same mode: against our torch backend and against the PIL
    baseline), ``vs_decode`` (loader decodes vs the decode ceiling) and, with several compute
    variants, ``vs_eager``."""
    variants = [r for r in rows if r["mode"] == "compute"]
    eager = next((r for r in variants if r.get("variant") == "eager"), variants[0] if variants else None)
    for row in variants:
        if len(variants) > 1 and eager is not None and row["status"] == eager["status"] == "ok":
            mine, ref = row["figures"]["images_per_s"]["windows"], eager["figures"]["images_per_s"]["windows"]
            row["vs_eager"] = Spread.of(a / b for a, b in zip(mine, ref)).as_dict()
            row["reference"] = eager.get("variant")
    torch_rows = {r["mode"]: r for r in rows if r["backend"] == "torch"}
    baseline_rows = {r["mode"]: r for r in rows if r["backend"] == BASELINE}
    decode = next((r for r in rows if r["mode"] == "decode"), None)
    ceiling = median(decode) if decode is not None else None
    for row in rows:
        mine = median(row)
        for key, refs in (("vs_torch", torch_rows), ("vs_pil", baseline_rows)):
            ref = refs.get(row["mode"])
            theirs = median(ref) if ref is not None else None
            row[key] = mine / theirs if mine is not None and theirs and row["backend"] != "-" else None
        decodes = median(row, "decodes_per_s") if row["mode"] == "loader" else None
        row["vs_decode"] = decodes / ceiling if decodes is not None and ceiling else None


def verdicts(rows: list[dict]) -> list[dict]:
    """One verdict per backend with a loader or e2e figure in ``rows``."""
    compute = compute_reference(rows)
    compute_ips = median(compute) if compute is not None else None
    out = []
    for backend in dict.fromkeys(r["backend"] for r in rows if r["mode"] in ("loader", "e2e")):
        loader = next((r for r in rows if r["mode"] == "loader" and r["backend"] == backend), None)
        e2e = next((r for r in rows if r["mode"] == "e2e" and r["backend"] == backend), None)
        wait = e2e["figures"].get("data_wait_frac", {}) if e2e and e2e.get("figures") else {}
        v = verdict(wait_frac=wait.get("overall", median(e2e, "data_wait_frac")) if e2e else None,
                    e2e_ips=median(e2e) if e2e else None,
                    loader_ips=median(loader) if loader else None, compute_ips=compute_ips)
        if v is not None:
            out.append({"backend": backend, **asdict(v)})
    return out


# --------------------------------------------------------------------------- Markdown


def _num(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def _ratio(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.2f}x" if x >= 0.01 else f"{x:.2g}x"


def _mode_cell(row: dict) -> str:
    variant = row.get("variant", "config")
    return row["mode"] if variant == "config" else f"{row['mode']}: {variant}"


def _spread_cell(spread: dict | None) -> tuple[str, str]:
    if spread is None:
        return "", ""
    return _num(spread["median"]), f"{_num(spread['min'])}–{_num(spread['max'])}"


def markdown_table(rows: Sequence[dict], unit: str) -> str:
    """The result rows as a Markdown table; ``unit`` names the per-device
    figure (``img/s/GPU`` or ``img/s/process``)."""
    head = (f"| mode | backend | {unit} (median) | min–max | views/s | decodes/s | img/s/core | CPU cores | "
            "peak RSS MB | data wait | vs PIL baseline | vs torch | vs decode |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        if row["status"] != "ok":
            label = "error" if row["status"] == "error" else "unavailable"
            if row["status"] == "unavailable" and row["backend"] in BACKEND_NAMES:
                label = "backend unavailable"
            cells = [_mode_cell(row), row["backend"], f"{label}: {row['reason']}"] + [""] * 10
            lines.append("| " + " | ".join(cells) + " |")
            continue
        f = row["figures"]
        ips, ips_range = _spread_cell(f.get("images_per_s"))
        wait = f.get("data_wait_frac")
        cells = [
            _mode_cell(row), row["backend"], ips, ips_range,
            _spread_cell(f.get("views_per_s"))[0], _spread_cell(f.get("decodes_per_s"))[0],
            _num(f.get("images_per_s_per_core")), _num(f.get("cpu_cores_used"), 2), _num(f.get("peak_rss_mb"), 0),
            "" if wait is None else f"{100 * wait['median']:.0f}%",
            _ratio(row.get("vs_pil")), _ratio(row.get("vs_torch")), _ratio(row.get("vs_decode")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variant_lines(rows: Sequence[dict]) -> list[str]:
    """With several compute variants: each one's images/s relative to the reference variant
    (eager, else the first), window by window, its settings and its warm-up time (compilation included)."""
    variants = [r for r in rows if r["mode"] == "compute" and r["status"] == "ok"]
    if len(variants) < 2:
        return []
    reference = next((r.get("reference") for r in variants if r.get("reference")), "eager")
    lines = ["", f"step variants (compute img/s over {reference}'s, window by window: median (min–max); warm-up "
                 "includes compilation):"]
    for row in variants:
        ratio = row.get("vs_eager")
        rel = "" if ratio is None else f"{ratio['median']:.2f}x ({ratio['min']:.2f}–{ratio['max']:.2f}x)"
        settings = ", ".join(f"{k}={v}" for k, v in row.get("settings", {}).items())
        lines.append(f"  {row['variant']}: {rel or 'no eager row to compare with'}; {settings}; "
                     f"warm-up {row['figures'].get('warmup_seconds', 0.0):.1f} s")
    return lines


def describe_groups(shape: dict) -> str:
    """``2 views at 224 px`` or ``2 x 224 px + 6 x 96 px views`` (older reports: two views)."""
    groups = shape.get("view_groups") or [{"count": 2, "resolution": shape["resolution"]}]
    if len(groups) == 1:
        return f"{groups[0]['count']} views at {groups[0]['resolution']} px"
    return " + ".join(f"{g['count']} x {g['resolution']} px" for g in groups) + " views; " \
        f"{shape['network_images_per_unlabeled']:.2f} images and {shape['pixels_per_unlabeled_in_global_views']:.2f} " \
        "global views of pixels through the network per unlabeled image"


def markdown_report(report: dict) -> str:
    """Header (device, versions, shapes), the table, aggregates and verdicts."""
    env, shape = report["environment"], report["shape"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        f"device: {env['device']}  (world size {env['world_size']}, {env['torch_threads']} torch threads per process)",
        f"versions: {versions}",
        f"shape: {shape['arch']}, {shape['unlabeled_batch_size']} x ({describe_groups(shape)})"
        f" + {shape['support_images']} support ({shape['support_classes']} classes"
        f" x {shape['support_images_per_class']}"
        f" x {shape['support_views']} views), {shape['precision']}, channels-last {shape['channels_last']}, "
        f"{shape['num_workers']} loader workers",
        f"timing: {report['timing']['warmup_steps']} warm-up steps, then {report['timing']['windows']} windows of "
        f"{report['timing']['steps_per_window']} steps",
        "",
        markdown_table(report["results"], report["unit"]),
        "",
        FIGURE_NOTE,
    ]
    if env["world_size"] > 1:
        lines.append("")
        for row in report["results"]:
            if row["status"] == "ok" and "images_per_s" in row.get("aggregate", {}):
                lines.append(f"aggregate {row['mode']}/{row['backend']}: "
                             f"{row['aggregate']['images_per_s']:,.1f} img/s over {env['world_size']} ranks")
    lines += variant_lines(report["results"])
    notes = [f"{_mode_cell(r)}/{r['backend']}: {r['figures']['skipped_steps']} steps skipped on a non-finite loss"
             for r in report["results"] if r["status"] == "ok" and r["figures"].get("skipped_steps")]
    lines += [""] + [f"verdict {v['backend']}: {v['text']}" for v in report["verdicts"]] + notes
    return "\n".join(lines).rstrip() + "\n"


PLOT_SUFFIX = {"decode": " (decodes)", "augment": " (views)"}


def save_plot(report: dict, path: str) -> None:
    """Horizontal bars of each ok row's median images/s, whiskers min–max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["status"] == "ok"]
    labels = [f"{_mode_cell(r)} / {r['backend']}" + PLOT_SUFFIX.get(r["mode"], "") for r in rows]
    spreads = [r["figures"]["images_per_s"] for r in rows]
    med = [s["median"] for s in spreads]
    err = [[m - s["min"] for m, s in zip(med, spreads)], [s["max"] - m for m, s in zip(med, spreads)]]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    ax.barh(labels, med, xerr=err, color="tab:blue", capsize=3)
    ax.invert_yaxis()
    ax.set_xlabel(report["unit"] + " (median, whiskers min–max)")
    ax.set_title(report["environment"]["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
