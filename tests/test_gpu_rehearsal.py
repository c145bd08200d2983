"""tools/gpu_check.sh rehearsed on the CPU (GPU_REHEARSAL=1), so that the script a GPU loan runs cannot
rot between loans. The suite runs the core of the first call (GPU_STAGES): the stage plumbing and its
log, the three compute stages (SimCLR + SuNCEt, SwAV + SuNCEt and PAWS, each as configured and with
the step switches, timed in turns, at tiny shapes), the data stage (generated digits, converted for
FFCV and DALI where they import) and an e2e stage on the torch backend. The whole rehearsal, every
stage of every phase, is ``GPU_REHEARSAL=1 bash tools/gpu_check.sh`` (BENCHMARKS.md, "GPU check")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("compute-simclr", "compute-swav", "compute-paws", "data", "e2e-torch-multicrop")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_rehearses_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_REHEARSAL": "1", "GPU_STAGES": " ".join(STAGES), "OUT": str(out),
           "GPU_DATA": str(tmp_path / "data"), "GPU_SITE": str(tmp_path / "site"), "GPU_PARTS": str(tmp_path / "parts"),
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=870)
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0, log[-4000:]
    for stage in STAGES:
        assert f"[time] {stage}: " in log and f"[time] {stage}: " in proc.stdout
    assert "=== summary (phase all, rehearsal on the CPU" in proc.stdout
    summary = log.split("=== summary")[-1].splitlines()  # each stage's [time] line again, then the total
    times = [line for line in summary if line.startswith("[time] ") and not line.startswith("[time] total")]
    assert len(times) == len(STAGES) and all(" s (CPU " in line and line.endswith("rc 0") for line in times), times

    for method in ("simclr", "swav", "paws"):  # one JSON per objective: its step as configured and two switches
        (compute,) = out.glob(f"*-compute-{method}.json")
        report = json.loads(compute.read_text())
        assert report["complete"] and report["unit"] == "img/s/process"
        rows = report["results"]
        assert [r["status"] for r in rows] == ["ok"] * 3, [r.get("reason") for r in rows]
        assert [r["variant"] for r in rows] == ["config", "foreach", "foreach+nosync"]
        assert [r["settings"]["method"] for r in rows] == [method] * 3
        assert [r["settings"]["lars_foreach"] for r in rows] == [False, True, True]
        assert [r["settings"]["host_sync"] for r in rows] == ["step", "step", "log"]
        assert [r["reference"] for r in rows] == ["config"] * 3
    swav = json.loads(next(out.glob("*-compute-swav.json")).read_text())
    assert swav["shape"]["view_groups"] == [{"count": 2, "resolution": 32}, {"count": 2, "resolution": 16}]

    (fed,) = out.glob("*-e2e-torch-multicrop.json")
    report = json.loads(fed.read_text())
    assert report["complete"] and report["shape"]["view_groups"] == [{"count": 2, "resolution": 32},
                                                                     {"count": 2, "resolution": 16}]
    assert [(r["mode"], r["backend"], r["status"]) for r in report["results"]] == [("loader", "torch", "ok"),
                                                                                   ("e2e", "torch", "ok")]
