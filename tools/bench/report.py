"""Result rows, figures, ratios, warnings and verdicts of ``tools.throughput`` (``render`` shows them).

Pure functions of measured timings: no torch, no device, so the verdict and
the report layout can be tested on synthetic numbers.

A result row (one per mode and backend) is a plain dict, the unit of the JSON
report::

    {"mode": "loader", "backend": "torch", "status": "ok" | "unavailable" | "error",
     "reason": None | str,
     "figures": {"images_per_s": SPREAD, "views_per_s": SPREAD, ...,   # per GPU / process
                 "cpu_cores_used": float, "images_per_s_per_core": float,
                 "cpu_ms_per_image": SPREAD,   # CPU time of the process and its workers
                 "peak_rss_mb": float, "steps": int},
     "ranks": [FIGURES, ...],          # one per rank, only under torchrun
     "aggregate": {"images_per_s": float, ...},  # sum over ranks of the medians
     "vs_torch": float | None,         # images_per_s / the torch row's, same mode
     "vs_pil": float | None,           # images_per_s / the PIL baseline's (pil-reference), same mode
     "vs_decode": float | None,        # loader decodes_per_s / the decode ceiling
     "suspect": True,                  # only on an e2e row faster than compute-only (e2e_above_compute)
     "cores_at_feed_rate": float}      # only on a host row (add_host_cores)

where ``SPREAD`` is ``{"median", "min", "max", "windows": [...]}`` over the
timed windows (see ``Spread``). A ``compute`` row also names its step
``variant`` (``config`` unless ``--step-variants`` says otherwise) and the
``settings`` it ran with, its ``reference`` variant (``tools.bench.variants.reference_of``)
and, with several variants, ``vs_eager``: the SPREAD of its images/s over the
reference's, window by window (the variants are timed in turns, so window i of
each saw the same moment of the machine).
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
    variants, ``vs_eager`` (against the row's ``reference`` variant)."""
    variants = [r for r in rows if r["mode"] == "compute"]
    by_name = {r.get("variant", "config"): r for r in variants}
    for row in variants:
        ref = by_name.get(row.get("reference"))
        if len(variants) > 1 and ref is not None and row["status"] == ref["status"] == "ok":
            mine, theirs = row["figures"]["images_per_s"]["windows"], ref["figures"]["images_per_s"]["windows"]
            row["vs_eager"] = Spread.of(a / b for a, b in zip(mine, theirs)).as_dict()
    torch_rows = {r["mode"]: r for r in rows if r["backend"] == "torch"}
    baseline_rows = {r["mode"]: r for r in rows if r["backend"] == BASELINE}
    decode = next((r for r in rows if r["mode"] == "decode"), None)
    ceiling = median(decode) if decode is not None else None
    for row in rows:
        mine = median(row)
        for key, refs in (("vs_torch", torch_rows), ("vs_pil", baseline_rows)):
            ref = refs.get(row["mode"])
            theirs = median(ref) if ref is not None else None
            comparable = row["backend"] != "-" and row["mode"] != "host"  # host: CPU time is the figure
            row[key] = mine / theirs if mine is not None and theirs and comparable else None
        decodes = median(row, "decodes_per_s") if row["mode"] == "loader" else None
        row["vs_decode"] = decodes / ceiling if decodes is not None and ceiling else None


def verdicts(rows: list[dict]) -> list[dict]:
    """One verdict per backend with a loader or e2e figure in ``rows`` (none drawn from a
    ``suspect`` e2e row: call ``e2e_above_compute`` first)."""
    compute = compute_reference(rows)
    compute_ips = median(compute) if compute is not None else None
    out = []
    for backend in dict.fromkeys(r["backend"] for r in rows if r["mode"] in ("loader", "e2e")):
        loader = next((r for r in rows if r["mode"] == "loader" and r["backend"] == backend), None)
        e2e = next((r for r in rows if r["mode"] == "e2e" and r["backend"] == backend), None)
        if e2e is not None and e2e.get("suspect"):
            out.append({"backend": backend, "bound": None, "factor": None,
                        "text": "not drawn: e2e ran faster than the compute-only step (see the warning)"})
            continue
        wait = e2e["figures"].get("data_wait_frac", {}) if e2e and e2e.get("figures") else {}
        v = verdict(wait_frac=wait.get("overall", median(e2e, "data_wait_frac")) if e2e else None,
                    e2e_ips=median(e2e) if e2e else None,
                    loader_ips=median(loader) if loader else None, compute_ips=compute_ips)
        if v is not None:
            out.append({"backend": backend, **asdict(v)})
    return out


# --------------------------------------------------------------------------- checks and host cores

# An e2e figure above the compute-only step's best window by more than this share is not a
# speed-up but a change of machine load between the two measurements (``e2e_above_compute``).
E2E_ABOVE_COMPUTE = 0.05


def e2e_above_compute(rows: list[dict]) -> list[str]:
    """A warning for each e2e row faster than the compute-only step beyond noise (above its best
    window by more than ``E2E_ABOVE_COMPUTE``). A step fed by a loader cannot outrun the same step
    on batches already in place, so the machine's load changed between the measurements: the row
    is marked ``suspect``, and ``verdicts`` draws no verdict from it."""
    compute = compute_reference(rows)
    for row in rows:
        row.pop("suspect", None)
    if compute is None or compute["status"] != "ok":
        return []
    spread = compute["figures"]["images_per_s"]
    out = []
    for row in rows:
        fed = median(row) if row["mode"] == "e2e" else None
        if fed is None or fed <= spread["max"] * (1 + E2E_ABOVE_COMPUTE):
            continue
        row["suspect"] = True
        out.append(f"e2e / {row['backend']} ran at {fed:,.1f} img/s, {fed / spread['median']:.2f}x the compute-only "
                   f"step ({spread['median']:,.1f} img/s, best window {spread['max']:,.1f}). A step fed by a loader "
                   "cannot outrun the same step on batches already in memory: the machine's load changed between "
                   "the two measurements, and this backend's ratios and verdict do not hold. Measure on a quieter "
                   "machine, or with more steps and windows (--steps, --windows) so that both span the same "
                   "conditions; CPU ms per image is the figure that load disturbs least.")
    return out


def add_host_cores(rows: list[dict], feed_rate: float, compute_rate: float | None) -> None:
    """``host`` rows: the cores one GPU's loader needs, CPU ms per unlabeled image x the rate
    (``--feed-rate``, and on a GPU the compute-only step's rate)."""
    for row in rows:
        if row["mode"] == "host" and row["status"] == "ok":
            ms = row["figures"]["cpu_ms_per_image"]["median"]
            row["cores_at_feed_rate"] = ms * feed_rate / 1000
            row["cores_at_compute_rate"] = ms * compute_rate / 1000 if compute_rate else None
