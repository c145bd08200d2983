"""tools.throughput: verdict logic on synthetic timings, report layout, and
short CPU runs of every mode on generated data (no timing thresholds)."""
from __future__ import annotations

import json

import pytest

from tests.helpers.imagefolder import make_image_folder
from tools import throughput
from tools.bench import cli, measure, render
from tools.bench import report as rep
from tools.bench.report import Spread, verdict

# --------------------------------------------------------------------------- figures and verdict


def test_spread_median_min_max():
    s = Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.min, s.max, s.windows) == (2.5, 1.0, 10.0, (3.0, 1.0, 2.0, 10.0))
    with pytest.raises(ValueError):
        Spread.of([])


def test_rates_per_window():
    assert rep.rates([10, 20], [1.0, 4.0]).windows == (10.0, 5.0)


def test_loader_bound_from_measured_wait():
    v = verdict(wait_frac=0.6, e2e_ips=40.0, loader_ips=45.0, compute_ips=100.0)
    assert v.bound == "loader"
    assert v.factor == pytest.approx(2.5)  # with data always ready: 1 / (1 - 0.6)
    assert "loader-bound" in v.text and "60%" in v.text and "isolated" in v.text


def test_compute_bound_reports_loader_headroom():
    v = verdict(wait_frac=0.02, e2e_ips=100.0, loader_ips=300.0, compute_ips=105.0)
    assert v.bound == "compute" and v.factor == pytest.approx(3.0)
    assert verdict(wait_frac=0.02, e2e_ips=100.0).factor is None  # no loader-only figure


def test_threshold_is_inclusive():
    assert verdict(wait_frac=0.1, e2e_ips=1.0, threshold=0.1).bound == "loader"
    assert verdict(wait_frac=0.0999, e2e_ips=1.0, threshold=0.1).bound == "compute"


def test_measured_wait_wins_over_isolated_figures():
    # isolated figures say the loader is faster, but the e2e run waited: trust the e2e run
    assert verdict(wait_frac=0.3, e2e_ips=50.0, loader_ips=200.0, compute_ips=100.0).bound == "loader"


def test_fed_step_slower_than_compute_only_is_pointed_out():
    # 10% wait, so the step itself ran at 50 / 0.9 = 55.6 img/s against 100 on synthetic batches
    v = verdict(wait_frac=0.1, e2e_ips=50.0, loader_ips=400.0, compute_ips=100.0)
    assert "1.80x slower fed by the loader" in v.text
    assert "slower fed" not in verdict(wait_frac=0.1, e2e_ips=85.0, loader_ips=400.0, compute_ips=100.0).text


def test_isolated_figures_without_e2e():
    v = verdict(loader_ips=50.0, compute_ips=200.0)
    assert (v.bound, v.factor) == ("loader", pytest.approx(4.0))
    v = verdict(loader_ips=300.0, compute_ips=100.0)
    assert (v.bound, v.factor) == ("compute", pytest.approx(3.0))
    assert verdict(loader_ips=300.0) is None
    assert verdict() is None


def _ok(mode, backend, ips, **extra):
    figures = {"images_per_s": Spread.of([ips]).as_dict(), **extra}
    return {"mode": mode, "backend": backend, "status": "ok", "reason": None, "figures": figures}


def test_ratios_and_verdicts_from_rows():
    rows = [
        _ok("decode", "-", 1000.0, decodes_per_s=Spread.of([1000.0]).as_dict()),
        _ok("compute", "-", 200.0),
        _ok("loader", "torch", 50.0, decodes_per_s=Spread.of([100.0]).as_dict()),
        _ok("loader", "dali", 150.0, decodes_per_s=Spread.of([300.0]).as_dict()),
        _ok("e2e", "dali", 140.0, data_wait_frac=Spread.of([0.05]).as_dict()),
        {"mode": "loader", "backend": "ffcv", "status": "unavailable", "reason": "ImportError: no ffcv"},
        _ok("loader", "pil-reference", 75.0),
    ]
    rep.add_ratios(rows)
    assert rows[2]["vs_torch"] == pytest.approx(1.0) and rows[2]["vs_decode"] == pytest.approx(0.1)
    assert rows[3]["vs_torch"] == pytest.approx(3.0) and rows[3]["vs_decode"] == pytest.approx(0.3)
    assert rows[5]["vs_torch"] is None and rows[0]["vs_torch"] is None
    # against the PIL baseline, same mode only
    assert rows[3]["vs_pil"] == pytest.approx(2.0) and rows[2]["vs_pil"] == pytest.approx(50 / 75)
    assert rows[4]["vs_pil"] is None and rows[6]["vs_pil"] == pytest.approx(1.0)
    by_backend = {v["backend"]: v for v in rep.verdicts(rows)}
    assert set(by_backend) == {"torch", "dali", "pil-reference"}  # ffcv has no figure
    assert by_backend["torch"]["bound"] == "loader" and by_backend["torch"]["factor"] == pytest.approx(4.0)
    assert by_backend["dali"]["bound"] == "compute"


def test_overall_wait_catches_a_loader_that_falls_behind_in_some_windows():
    # Seen on a GPU: prefetched batches made most windows wait-free, two waited 70-90%.
    wait = Spread.of([0.0, 0.0, 0.7, 0.9, 0.0]).as_dict()
    wait["overall"] = 0.7
    rows = [_ok("compute", "-", 840.0), _ok("e2e", "torch", 700.0, data_wait_frac=wait)]
    (v,) = rep.verdicts(rows)
    assert wait["median"] == 0.0 and v["bound"] == "loader"


def test_e2e_faster_than_compute_only_is_a_warning_not_a_verdict():
    """Issue 35: on a busy machine FFCV's e2e ran at 14.8 img/s against a compute-only 7.6, the table
    printed 2.31x vs torch and the verdict said compute-bound. A fed step cannot outrun the same step
    on ready batches: say so, with what to do, and draw no verdict or ratio from it."""
    compute = {**_ok("compute", "-", 7.6), "variant": "config"}
    compute["figures"]["images_per_s"] = Spread.of([7.2, 7.6, 7.9]).as_dict()
    wait = Spread.of([0.01]).as_dict()
    rows = [compute, _ok("loader", "torch", 250.0), _ok("loader", "ffcv", 300.0),
            _ok("e2e", "torch", 6.4, data_wait_frac=wait), _ok("e2e", "ffcv", 14.8, data_wait_frac=wait),
            _ok("e2e", "dali", 8.2, data_wait_frac=wait)]  # 3.8% above compute's best window: noise
    rep.add_ratios(rows)
    (warning,) = rep.e2e_above_compute(rows)
    assert warning.startswith("e2e / ffcv ran at 14.8 img/s, 1.95x the compute-only step (7.6 img/s, best window 7.9)")
    assert "quieter machine" in warning and "--steps, --windows" in warning
    assert rows[4]["suspect"] and not any(r.get("suspect") for i, r in enumerate(rows) if i != 4)
    by_backend = {v["backend"]: v for v in rep.verdicts(rows)}
    assert by_backend["ffcv"]["bound"] is None and "not drawn" in by_backend["ffcv"]["text"]
    assert by_backend["torch"]["bound"] == "compute" and by_backend["dali"]["bound"] == "compute"
    ffcv_e2e = render.markdown_table(rows, "img/s/process").splitlines()[6]
    assert ffcv_e2e.startswith("| e2e | ffcv | 14.8 (!) |") and "2.31x" not in ffcv_e2e and "| (!) |" in ffcv_e2e
    rows[4]["figures"]["images_per_s"] = Spread.of([7.0]).as_dict()  # measured again: the flag goes
    assert rep.e2e_above_compute(rows) == [] and not rows[4].get("suspect")


def test_report_wording_counts_in_words():
    """'1 loader workers', '8.62 images and 4.52 global views of pixels' (issue 35): plain words, right plurals."""
    shape = {"arch": "resnet50", "resolution": 224, "unlabeled_batch_size": 1, "support_classes": 0,
             "support_images_per_class": 2, "support_views": 1, "support_images": 0,
             "view_groups": [{"count": 2, "resolution": 224}, {"count": 6, "resolution": 96}],
             "network_images_per_unlabeled": 8.0, "pixels_per_unlabeled_in_global_views": 3.1, "precision": "fp16",
             "channels_last": True, "num_workers": 1}
    report = {"environment": {"device": "GPU", "world_size": 1, "torch_threads": 1, "versions": {}},
              "shape": shape, "timing": {"warmup_steps": 1, "windows": 1, "steps_per_window": 1},
              "unit": "img/s/GPU", "results": [_ok("compute", "-", 10.0)], "verdicts": []}
    text = render.markdown_report(report)
    assert "1 unlabeled image x (2 x 224 px + 6 x 96 px views) + no support set" in text
    assert "the network sees 8.00 images per unlabeled image, 3.10x the pixels of one 224 px view" in text
    assert "1 loader worker per stream" in text and "(world size 1, 1 torch thread per process)" in text
    assert "timing: 1 warm-up step, then 1 window of 1 step" in text
    shape.update(num_workers=14, unlabeled_batch_size=44, support_images=40, support_classes=20)
    report["timing"] = {"warmup_steps": 5, "windows": 3, "steps_per_window": 10}
    text = render.markdown_report(report)
    assert "14 loader workers per stream" in text and "then 3 windows of 10 steps" in text
    assert "44 unlabeled images x" in text and "+ 40 support images (20 classes x 2 x 1 view)" in text


def test_combine_ranks_mean_per_gpu_and_sum_aggregate():
    ranks = [
        {"images_per_s": Spread.of([10.0, 12.0]).as_dict(), "cpu_cores_used": 1.0, "peak_rss_mb": 100.0,
         "images_per_s_per_core": None, "steps": 4},
        {"images_per_s": Spread.of([20.0, 16.0]).as_dict(), "cpu_cores_used": 3.0, "peak_rss_mb": 300.0,
         "images_per_s_per_core": 6.0, "steps": 4},
    ]
    figures, aggregate = rep.combine_ranks(ranks)
    assert figures["images_per_s"]["median"] == pytest.approx(14.5)  # mean of 11 and 18
    assert (figures["images_per_s"]["min"], figures["images_per_s"]["max"]) == (10.0, 20.0)
    assert figures["images_per_s"]["windows"] == [15.0, 14.0]
    assert figures["cpu_cores_used"] == 2.0 and figures["images_per_s_per_core"] is None and figures["steps"] == 4
    assert aggregate == {"images_per_s": pytest.approx(29.0), "cpu_cores_used": 4.0, "peak_rss_mb": 400.0}


def test_markdown_table_is_rectangular_and_names_unavailable_backends():
    rows = [_ok("compute", "-", 12.5, cpu_cores_used=2.0, images_per_s_per_core=6.25),
            {"mode": "loader", "backend": "dali", "status": "unavailable", "reason": "ImportError: no dali"}]
    rep.add_ratios(rows)
    table = render.markdown_table(rows, "img/s/GPU")
    lines = table.splitlines()
    assert len(lines) == 4 and "img/s/GPU" in lines[0]
    assert len({line.count("|") for line in lines}) == 1
    assert "backend unavailable: ImportError: no dali" in lines[3]


# --------------------------------------------------------------------------- the command on CPU

TINY = ["--model", "resnet18-small", "--resolution", "16", "--batch-size", "4", "--precision", "fp32",
        "--set", "model.head_hidden_dim=32", "--set", "model.head_out_dim=16", "--set", "data.support_classes=2",
        "--set", "data.labeled_fraction=0.5",
        "--steps", "2", "--windows", "2", "--warmup", "1", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("throughput_data")
    make_image_folder(root / "train", 3, 6, 24)
    return root


def _run(argv, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = throughput.main(argv + ["--json", str(out)])
    return code, json.loads(out.read_text()), capsys.readouterr().out


def test_compute_mode_needs_no_data(tmp_path, capsys):
    code, report, stdout = _run(["--mode", "compute"] + TINY, tmp_path, capsys)
    assert code == 0
    assert report["schema"] == "tools.throughput/1" and report["unit"] == "img/s/process" and report["complete"]
    assert report["shape"]["views_per_step"] == 2 * 4 + 2 * 2
    (row,) = report["results"]
    assert (row["mode"], row["status"]) == ("compute", "ok")
    ips = row["figures"]["images_per_s"]
    assert len(ips["windows"]) == 2 and ips["min"] <= ips["median"] <= ips["max"]
    assert row["figures"]["cpu_cores_used"] >= 0 and row["figures"]["peak_rss_mb"] > 0
    assert report["environment"]["versions"]["torch"]
    assert "| compute | - |" in stdout and report["environment"]["device"] in stdout


def test_json_keeps_what_was_measured_when_the_run_is_killed(tmp_path):
    """A stage killed by its time limit (tools/gpu_check.sh runs each under ``timeout``) keeps the
    figures measured before the kill: the JSON is written after every measurement."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "report.json"
    argv = ["--mode", "compute,augment", "--json", str(out)] + TINY
    script = ("import os, sys\nfrom tools import throughput\nfrom tools.bench import measure\n"
              "measure.measure_augment = lambda *a, **k: os.kill(os.getpid(), 9)  # killed: no cleanup runs\n"
              f"sys.exit(throughput.main({argv!r}))\n")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] is False
    (row,) = report["results"]
    assert (row["mode"], row["status"]) == ("compute", "ok") and row["figures"]["images_per_s"]["median"] > 0


def test_every_mode_on_generated_data(tmp_path, capsys, monkeypatch, tiny_data):
    real_build = cli.build_loaders

    def build(cfg, *args):  # other backends "missing", deterministically
        if cfg.data.backend != "torch":
            raise ImportError(f"No module named 'pipelines.{cfg.data.backend}_backend'")
        return real_build(cfg, *args)

    monkeypatch.setattr(cli, "build_loaders", build)
    png = tmp_path / "chart.png"
    argv = ["--backend", "all", "--mode", "all", "--data", str(tiny_data), "--workers", "1",
            "--decode-workers", "1", "--plot", str(png)] + TINY
    code, report, stdout = _run(argv, tmp_path, capsys)
    rows = {(r["mode"], r["backend"]): r for r in report["results"]}
    assert code == 0, [r.get("reason") for r in report["results"]]
    for key in [("decode", "-"), ("compute", "-"), ("augment", "-"), ("loader", "torch"), ("e2e", "torch"),
                ("host", "torch")]:
        assert rows[key]["status"] == "ok", rows[key]
    for backend in ("dali", "ffcv"):
        for mode in ("loader", "e2e", "host"):
            assert rows[(mode, backend)]["status"] == "unavailable"
        assert f"backend unavailable: ImportError: No module named 'pipelines.{backend}_backend'" in stdout
    loader = rows[("loader", "torch")]
    assert set(loader["figures"]) >= {"images_per_s", "views_per_s", "decodes_per_s", "cpu_cores_used", "peak_rss_mb"}
    assert loader["vs_torch"] == pytest.approx(1.0) and loader["vs_decode"] > 0
    baseline = rows[("loader", "pil-reference")]  # measured in the same run, every ratio against it too
    assert baseline["status"] == "ok" and baseline["vs_pil"] == pytest.approx(1.0) and loader["vs_pil"] > 0
    wait = rows[("e2e", "torch")]["figures"]["data_wait_frac"]
    assert 0 <= wait["min"] <= wait["median"] <= wait["max"] <= 1
    verdicts = {v["backend"]: v for v in report["verdicts"]}
    assert set(verdicts) == {"pil-reference", "torch"}
    if any(w.startswith("e2e / torch ran at") for w in report["warnings"]):  # tiny steps on a busy machine
        assert verdicts["torch"]["bound"] is None and "not drawn" in verdicts["torch"]["text"]
    else:
        assert verdicts["torch"]["bound"] in ("loader", "compute")
    assert "verdict torch: " in stdout and "vs PIL baseline" in stdout
    host = rows[("host", "torch")]  # the workers' CPU time per image, and the cores at --feed-rate
    ms = host["figures"]["cpu_ms_per_image"]["median"]
    assert ms > 0 and host["cores_at_feed_rate"] == pytest.approx(ms * 2000 / 1000)
    assert host["cores_at_compute_rate"] is None and host["vs_torch"] is None  # on a CPU; CPU time is the figure
    assert "host CPU per unlabeled image, each backend as configured on a GPU" in stdout
    assert f"  torch: {ms:,.2f} ms" in stdout and "feed 2,000 img/s" in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multicrop_shape_counts_every_view(tmp_path, capsys, tiny_data):
    argv = ["--mode", "compute,loader", "--backend", "torch", "--data", str(tiny_data), "--workers", "0",
            "--views", "2x16,3x8:0.1-0.4"] + TINY
    code, report, stdout = _run(argv, tmp_path, capsys)
    assert code == 0, [r.get("reason") for r in report["results"]]
    shape = report["shape"]
    assert shape["view_groups"] == [{"count": 2, "resolution": 16}, {"count": 3, "resolution": 8}]
    assert shape["views_per_step"] == 5 * 4 + 2 * 2  # 5 views of 4 images + 2 classes x 2 support images
    assert shape["network_images_per_unlabeled"] == pytest.approx(6.0)
    assert shape["pixels_per_unlabeled_in_global_views"] == pytest.approx((2 + 3 / 4 + 1) / 1)
    assert "4 unlabeled images x (2 x 16 px + 3 x 8 px views) + 4 support images (2 classes x 2 x 1 view)" in stdout
    assert "the network sees 6.00 images per unlabeled image, 3.75x the pixels of one 16 px view" in stdout
    for bad in ("2y16", "2x16:0.1", "x16"):
        with pytest.raises(SystemExit):
            throughput.main(["--mode", "compute", "--views", bad] + TINY)
        assert "--views" in capsys.readouterr().err


def test_data_modes_refuse_to_run_without_data(capsys):
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--mode", "loader"] + TINY)
    assert exc.value.code == 2 and "needs --data" in capsys.readouterr().err


def test_backend_list_and_bad_backend():
    assert cli.parse_backends("ffcv,dali", "torch") == ("ffcv", "dali")
    assert cli.parse_backends(None, "dali") == ("dali",) and cli.parse_backends("all", "torch")[0] == "pil-reference"
    with pytest.raises(ValueError, match="unknown backend"):
        cli.parse_backends("ffcv,tensorflow", "torch")


def test_mode_list_and_bad_mode():
    assert cli.parse_modes("e2e,decode") == ("decode", "e2e")
    assert cli.parse_modes("all") == cli.MODES
    with pytest.raises(ValueError, match="unknown mode"):
        cli.parse_modes("loader,gpu")


def test_step_shape_follows_the_config():
    from train.config import load_config

    cfg = load_config("configs/imagenet_10pct_suncet.yaml")
    s = measure.step_shape(cfg)
    assert (s.unlabeled, s.support_images, s.views, s.decodes, s.resolution) == (44, 40, 128, 84, 224)
    simclr = measure.step_shape(load_config("configs/imagenet_simclr.yaml"))
    assert (simclr.support_images, simclr.views) == (0, 88)


def test_missing_augment_module_is_reported_unavailable(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pipelines.augment.batched", None)  # import now raises ImportError
    code, report, stdout = _run(["--mode", "augment"] + TINY, tmp_path, capsys)
    (row,) = report["results"]
    assert code == 0 and row["status"] == "unavailable" and "pipelines.augment.batched" in row["reason"]
    assert "| augment | - | unavailable: " in stdout


# --------------------------------------------------------------------------- step variants, exit status, imports


def test_step_variants_are_timed_in_one_run_against_eager(tmp_path, capsys):
    variants = ["eager", "foreach", "nosync", "foreach+nosync"]
    code, report, stdout = _run(["--mode", "compute", "--step-variants", ",".join(variants)] + TINY, tmp_path, capsys)
    assert code == 0
    rows = report["results"]
    assert [r["variant"] for r in rows] == variants and all(r["status"] == "ok" for r in rows)
    settings = {r["variant"]: r["settings"] for r in rows}
    assert settings["eager"] == {"method": "simclr", "unlabeled_batch_size": 4, "views_per_image": 2, "lars_foreach": False, "host_sync": "step",
                                 "compile": False, "cuda_graphs": False, "precision": "fp32",
                                 "network_images_per_unlabeled": 3.0}
    assert settings["foreach+nosync"]["lars_foreach"] and settings["foreach+nosync"]["host_sync"] == "log"
    for row in rows:  # window by window against eager's windows
        ips, ref = row["figures"]["images_per_s"]["windows"], rows[0]["figures"]["images_per_s"]["windows"]
        assert row["vs_eager"]["windows"] == pytest.approx([a / b for a, b in zip(ips, ref)])
    assert rows[0]["vs_eager"]["median"] == 1.0
    assert "| compute: foreach+nosync | - |" in stdout and "step variants" in stdout
    assert "  nosync: " in stdout


def test_objectives_are_timed_in_turns_at_their_own_shapes(tmp_path, capsys):
    """``@FILE`` variants: other objectives and view groups, each at its own batch shape, against the first."""
    swav = tmp_path / "swav.yaml"
    swav.write_text("loss: {method: swav, suncet_weight: 0.0, swav: {prototypes: 10}}\n"
                    "augment: {views: [{count: 2}, {count: 3, resolution: 8}]}\n")
    paws = tmp_path / "paws.yaml"
    paws.write_text("loss: {method: paws, suncet_weight: 0.0}\n")
    code, report, stdout = _run(["--mode", "compute", "--step-variants", f"config,@{swav},@{paws}"] + TINY, tmp_path,
                                capsys)
    assert code == 0, [r.get("reason") for r in report["results"]]
    simclr, sw, pw = report["results"]
    assert [r["settings"]["method"] for r in (simclr, sw, pw)] == ["simclr", "swav", "paws"]
    assert sw["settings"]["views_per_image"] == 5 and sw["settings"]["network_images_per_unlabeled"] == 5.0  # no support
    assert pw["settings"]["network_images_per_unlabeled"] == 3.0  # 2 views + its support set: 4 images / 4
    assert sw["reference"] == "config" and simclr["vs_eager"]["median"] == 1.0
    assert f"  @{swav}: " in stdout and "x) of config's" in stdout


def test_variant_the_device_cannot_run_is_an_error_row_and_exit_1(tmp_path, capsys):
    code, report, stdout = _run(["--mode", "compute", "--step-variants", "eager,cudagraphs"] + TINY, tmp_path, capsys)
    eager, graphs = report["results"]
    assert code == 1 and eager["status"] == "ok"
    assert graphs["status"] == "error" and "compute.cuda_graphs needs a CUDA device" in graphs["reason"]


def test_unknown_step_variant_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--mode", "compute", "--step-variants", "eager,turbo"] + TINY)
    assert exc.value.code == 2 and "unknown token(s) turbo" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["loader", "decode", "e2e"])
def test_missing_data_root_is_refused_in_one_line_before_measuring(tmp_path, capsys, mode):
    missing = tmp_path / "no_such_root"
    argv = ["--mode", mode, "--backend", "torch", "--data", str(missing), "--workers", "0", "--decode-workers", "1"]
    with pytest.raises(SystemExit) as exc:
        throughput.main(argv + TINY + ["--json", str(tmp_path / "report.json")])
    assert exc.value.code == 2 and f"--data {missing} is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_bench_imports_point_down():
    """tools.throughput imports train/pipelines helpers, never the training program; nothing imports tools."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]

    def imports(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        return names

    bench = [repo / "tools" / "throughput.py", *sorted((repo / "tools" / "bench").glob("*.py"))]
    for path in bench:
        assert not {n for n in imports(path) if n == "train.pretrain"}, path
    mine = ["step", "lars", "losses", "precision", "wiring", "pretrain", "config"]
    for name in mine:
        path = repo / "train" / f"{name}.py"
        assert not {n for n in imports(path) if n == "tools" or n.startswith("tools.")}, path


def test_views_take_crop_scales_in_exponent_notation():
    """Issue 34: ``2x32:1e-3-1`` was refused, its ``-`` taken for the range's."""
    from train.config import load_config

    yaml = cli.parse_views("2x32:1e-3-1,6x16:.05-1E-1")
    assert yaml == "[{count: 2, resolution: 32, crop_scale: [0.001, 1.0]}, {count: 6, resolution: 16, crop_scale: [0.05, 0.1]}]"
    groups = load_config(None, [f"augment.views={yaml}"]).augment.view_groups()
    assert [(g.count, g.resolution, tuple(g.recipe.crop_scale)) for g in groups] == [(2, 32, (0.001, 1.0)),
                                                                                   (6, 16, (0.05, 0.1))]
    for bad in ("2x16:1e-3", "2x16:-1-2", "2x16:1e-3-", "2x16:0.1-0.4-1"):
        with pytest.raises(ValueError, match="--views: expected COUNTxRES"):
            cli.parse_views(bad)


def test_overlay_variants_take_switches_and_the_command_lines_set(tmp_path, capsys):
    """``@FILE+foreach`` is that overlay's step with the switch, compared with ``@FILE``; the command
    line's ``--set`` (here --batch-size 4) wins over an overlay's value (8), as over --config's."""
    swav = tmp_path / "swav.yaml"
    swav.write_text("loss: {method: swav, suncet_weight: 0.0, swav: {prototypes: 10}}\n"
                    "data: {unlabeled_batch_size: 8}\n")
    variants = f"config,@{swav},@{swav}+foreach"
    code, report, stdout = _run(["--mode", "compute", "--step-variants", variants] + TINY, tmp_path, capsys)
    assert code == 0, [r.get("reason") for r in report["results"]]
    simclr, sw, fast = report["results"]
    assert [r["reference"] for r in (simclr, sw, fast)] == ["config", "config", f"@{swav}"]
    assert fast["settings"]["method"] == "swav" and fast["settings"]["lars_foreach"] and not sw["settings"]["lars_foreach"]
    ips, ref = fast["figures"]["images_per_s"], sw["figures"]["images_per_s"]
    assert fast["vs_eager"]["windows"] == pytest.approx([a / b for a, b in zip(ips["windows"], ref["windows"])])
    assert sw["settings"]["unlabeled_batch_size"] == 4  # --batch-size 4, not the overlay's 8
    assert f"  @{swav}+foreach: " in stdout and f"of @{swav}'s" in stdout
    with pytest.raises(SystemExit):
        throughput.main(["--mode", "compute", "--step-variants", f"@{swav}+turbo"] + TINY)
    assert "unknown token(s) turbo" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_host_mode_builds_each_backend_as_on_a_gpu(tmp_path, capsys, tiny_data):
    """--mode host on a CPU: FFCV decodes and crops without colouring (its views stay uint8: the
    device's colour stage is planned on the host, not applied), the torch backend hands over its
    workers' uint8 views, DALI's host feed runs without its graph; each gives CPU ms per image."""
    pytest.importorskip("ffcv")
    pytest.importorskip("nvidia.dali")
    import torch

    from tools.bench import host_cost
    from tools.convert_imagenet import ConvertOptions, convert
    from train.config import load_config
    from train.distributed import DistContext

    converted = tmp_path / "converted"
    convert(ConvertOptions(src=str(tiny_data), out=str(converted), splits=("train",), formats=("ffcv", "dali"),
                           labeled_fraction=0.5, jobs=1, progress=False))
    argv = ["--mode", "host", "--backend", "torch,ffcv,dali", "--data", str(tiny_data), "--data-for",
            f"ffcv={converted}", "--data-for", f"dali={converted}", "--workers", "1"] + TINY
    code, report, stdout = _run(argv, tmp_path, capsys)
    assert code == 0, [r.get("reason") for r in report["results"]]
    rows = {r["backend"]: r for r in report["results"]}
    for backend in ("torch", "ffcv", "dali"):
        assert rows[backend]["figures"]["cpu_ms_per_image"]["median"] > 0
        assert f"  {backend}: " in stdout
    cfg = load_config(None, cli.config_overrides(cli.build_parser().parse_args(argv)))
    ctx, data_for = DistContext(0, 1, 0, torch.device("cpu")), {"ffcv": str(converted), "dali": str(converted)}
    with host_cost.built_as_on_gpu("ffcv", ctx.device):
        ffcv = cli.train_stream(cfg, "ffcv", data_for, ctx, torch.float32)
    assert not ffcv.colour_on_loader and ffcv_decides_colour_placement_again()
    batch = next(host_cost.host_batches(ffcv, "ffcv", ctx.device))
    assert all(v.dtype == torch.uint8 for v in batch.views) and batch.support_images.dtype == torch.uint8
    torch_loader = cli.train_stream(cfg, "torch", data_for, ctx, torch.float32)
    batch = next(host_cost.host_batches(torch_loader, "torch", ctx.device))
    assert batch.views[0].dtype == torch.uint8 and batch.views[0].shape[-1] == 3  # as the workers made them
    dali = cli.train_stream(cfg, "dali", data_for, ctx, torch.float32)
    unlabeled, support = next(host_cost.host_batches(dali, "dali", ctx.device))
    assert len(unlabeled[0]) == 4 and len(support[0]) == 4  # encoded images of 4 unlabeled, 2 x 2 support


def ffcv_decides_colour_placement_again() -> bool:
    """``built_as_on_gpu`` puts FFCV's own choice back afterwards."""
    import torch

    from pipelines.backends.ffcv import loader

    return loader.colour_on_loader(torch.device("cpu")) is True
