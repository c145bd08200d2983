"""The Markdown report and the PNG chart of ``tools.throughput``: how the figures of
``tools.bench.report`` read, for people. No torch, no device."""
from __future__ import annotations

import textwrap
from typing import Sequence

from tools.bench.report import BACKEND_NAMES

# What the main figure counts, by mode.
FIGURE_NOTE = ("main figure: loader/compute/e2e/host = unlabeled images/s (each gives the shape's views; views/s "
               "adds the support); decode = images decoded/s; augment = views augmented/s. CPU ms/img: CPU time of "
               "the process and its workers per unlabeled image (decode: per decode; augment: per view)")
SUSPECT = " (!)"  # marks an e2e figure above the compute-only step (report.e2e_above_compute)

# --------------------------------------------------------------------------- Markdown


def plural(n: float, noun: str, nouns: str | None = None) -> str:
    """``1 loader worker``, ``2 loader workers``, ``1.5 cores``."""
    count = f"{n:,}" if isinstance(n, int) else f"{n:,.2f}"
    return f"{count} {noun if n == 1 else nouns or noun + 's'}"


def _num(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def _ratio(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.2f}x" if x >= 0.01 else f"{x:.2g}x"


def _mode_cell(row: dict) -> str:
    variant = row.get("variant", "config")
    return row["mode"] if variant == "config" else f"{row['mode']}: {variant}"


def _spread_cell(spread: dict | None, digits: int = 1) -> tuple[str, str]:
    if spread is None:
        return "", ""
    return _num(spread["median"], digits), f"{_num(spread['min'], digits)}–{_num(spread['max'], digits)}"


def markdown_table(rows: Sequence[dict], unit: str) -> str:
    """The result rows as a Markdown table; ``unit`` names the per-device
    figure (``img/s/GPU`` or ``img/s/process``)."""
    head = (f"| mode | backend | {unit} (median) | min–max | views/s | decodes/s | img/s/core | CPU cores | "
            "CPU ms/img | peak RSS MB | data wait | vs PIL baseline | vs torch | vs decode |")
    width = head.count("|") - 1
    lines = [head, "|" + "---|" * width]
    for row in rows:
        if row["status"] != "ok":
            label = "error" if row["status"] == "error" else "unavailable"
            if row["status"] == "unavailable" and row["backend"] in BACKEND_NAMES:
                label = "backend unavailable"
            cells = [_mode_cell(row), row["backend"], f"{label}: {row['reason']}"] + [""] * (width - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        f = row["figures"]
        ips, ips_range = _spread_cell(f.get("images_per_s"))
        wait = f.get("data_wait_frac")
        cells = [
            _mode_cell(row), row["backend"], ips + (SUSPECT if row.get("suspect") else ""), ips_range,
            _spread_cell(f.get("views_per_s"))[0], _spread_cell(f.get("decodes_per_s"))[0],
            _num(f.get("images_per_s_per_core")), _num(f.get("cpu_cores_used"), 2),
            _spread_cell(f.get("cpu_ms_per_image"), 2)[0], _num(f.get("peak_rss_mb"), 0),
            "" if wait is None else f"{100 * wait['median']:.0f}%",
            *[SUSPECT.strip() if row.get("suspect") else _ratio(row.get(k)) for k in ("vs_pil", "vs_torch")],
            _ratio(row.get("vs_decode")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variant_lines(rows: Sequence[dict]) -> list[str]:
    """With several compute variants: each one's images/s relative to its reference variant,
    window by window, its settings and its warm-up time (compilation included)."""
    variants = [r for r in rows if r["mode"] == "compute" and r["status"] == "ok"]
    if len(variants) < 2:
        return []
    lines = ["", "step variants (compute img/s over the reference variant's, window by window: median (min–max); "
                 "warm-up includes compilation):"]
    for row in variants:
        ratio = row.get("vs_eager")
        rel = "" if ratio is None else f"{ratio['median']:.2f}x ({ratio['min']:.2f}–{ratio['max']:.2f}x)"
        settings = ", ".join(f"{k}={v}" for k, v in row.get("settings", {}).items())
        against = f"{rel} of {row.get('reference')}'s" if rel else "no reference row to compare with"
        lines.append(f"  {row['variant']}: {against}; {settings}; "
                     f"warm-up {row['figures'].get('warmup_seconds', 0.0):.1f} s")
    return lines


def describe_shape(shape: dict) -> str:
    """The step's shape in words: images, views, support set and what the network sees."""
    groups = shape.get("view_groups") or [{"count": 2, "resolution": shape["resolution"]}]
    views = " + ".join(f"{g['count']} x {g['resolution']} px" for g in groups)
    support = "no support set"
    if shape["support_images"]:
        support = (f"{plural(shape['support_images'], 'support image')} ({shape['support_classes']} classes x "
                   f"{shape['support_images_per_class']} x {plural(shape['support_views'], 'view')})")
    text = f"{shape['arch']}, {plural(shape['unlabeled_batch_size'], 'unlabeled image')} x ({views} views) + {support}"
    if "network_images_per_unlabeled" in shape:  # older reports lack it
        text += (f"; the network sees {shape['network_images_per_unlabeled']:.2f} images per unlabeled image, "
                 f"{shape['pixels_per_unlabeled_in_global_views']:.2f}x the pixels of one {groups[0]['resolution']} px "
                 "view")
    return text


def host_lines(report: dict) -> list[str]:
    """``--mode host``: each backend's CPU time per unlabeled image as on a GPU, and the cores it needs."""
    rows = [r for r in report["results"] if r["mode"] == "host" and r["status"] == "ok"]
    if not rows:
        return []
    rate = report.get("feed_rate")
    lines = ["", "host CPU per unlabeled image, each backend as configured on a GPU (median, min–max over windows):"]
    for row in rows:
        ms, spread = _spread_cell(row["figures"]["cpu_ms_per_image"], 2)
        line = f"  {row['backend']}: {ms} ms ({spread}); {plural(row['cores_at_feed_rate'], 'core')} feed {rate:,.0f} img/s"
        if row.get("cores_at_compute_rate") is not None:
            line += (f", {plural(row['cores_at_compute_rate'], 'core')} this GPU's compute-only "
                     f"{report['compute_rate']:,.0f} img/s")
        lines.append(line)
    return lines


def markdown_report(report: dict) -> str:
    """Header (device, versions, shapes), the table, aggregates, warnings and verdicts."""
    env, shape, timing = report["environment"], report["shape"], report["timing"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        f"device: {env['device']}  (world size {env['world_size']}, "
        f"{plural(env['torch_threads'], 'torch thread')} per process)",
        f"versions: {versions}",
        f"shape: {describe_shape(shape)}; {shape['precision']}, "
        f"{'channels-last' if shape['channels_last'] else 'channels-first'}, "
        f"{plural(shape['num_workers'], 'loader worker')} per stream",
        f"timing: {plural(timing['warmup_steps'], 'warm-up step')}, then {plural(timing['windows'], 'window')} of "
        f"{plural(timing['steps_per_window'], 'step')}",
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
    lines += variant_lines(report["results"]) + host_lines(report)
    notes = [f"{_mode_cell(r)}/{r['backend']}: {plural(r['figures']['skipped_steps'], 'step')} skipped on a "
             "non-finite loss" for r in report["results"] if r["status"] == "ok" and r["figures"].get("skipped_steps")]
    lines += [""] + [f"warning{SUSPECT}: {w}" for w in report.get("warnings", [])]
    lines += [f"verdict {v['backend']}: {v['text']}" for v in report["verdicts"]] + notes
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- chart

# Per mode: the figure a panel shows and its axis label ("" for the report's unit).
PANELS = {"decode": ("images_per_s", "decodes/s"), "augment": ("images_per_s", "views/s"),
          "host": ("cpu_ms_per_image", "host CPU ms per unlabeled image, as on a GPU")}


def save_plot(report: dict, path: str) -> None:
    """One panel per mode, each on its own axis (compute-only and e2e bars of a few img/s stay
    readable beside a loader's thousands), the median as a bar with its value written on it,
    whiskers min–max; the e2e panel marks the compute-only rate, which e2e cannot exceed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["status"] == "ok"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    heights = [len([r for r in rows if r["mode"] == m]) + 1.2 for m in modes]
    fig, axes = plt.subplots(len(modes), 1, figsize=(9, 0.45 * sum(heights) + 1.2), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    compute = next((r for r in rows if r["mode"] == "compute" and r.get("variant", "config") == "config"), None)
    for ax, mode in zip(axes[:, 0], modes):
        mine = [r for r in rows if r["mode"] == mode]
        key, unit = PANELS.get(mode, ("images_per_s", ""))
        spreads = [r["figures"][key] for r in mine]
        med = [s["median"] for s in spreads]
        err = [[m - s["min"] for m, s in zip(med, spreads)], [s["max"] - m for m, s in zip(med, spreads)]]
        labels = [(r.get("variant") if r["backend"] == "-" else r["backend"]) or mode for r in mine]
        bars = ax.barh(labels, med, xerr=err, color="tab:orange" if mode == "e2e" else "tab:blue", capsize=3)
        digits = 2 if key == "cpu_ms_per_image" else 1
        ax.bar_label(bars, labels=[f"{m:,.{digits}f}" + (SUSPECT if r.get("suspect") else "")
                                   for m, r in zip(med, mine)], padding=4, fontsize=8)
        right = max(s["max"] for s in spreads)
        if mode == "e2e" and compute is not None:
            rate = compute["figures"]["images_per_s"]["median"]
            ax.axvline(rate, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"compute-only {rate:,.1f}", (rate, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -10), textcoords="offset points", fontsize=7, color="grey")
            right = max(right, rate)
        ax.set_xlim(0, 1.3 * right)
        ax.invert_yaxis()
        ax.set_title(f"{mode}: {unit or report['unit']} (median, whiskers min–max)", fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{report['environment']['device']}\n" + textwrap.fill(describe_shape(report["shape"]), 120),
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
