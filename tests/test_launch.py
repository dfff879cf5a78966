"""The README's main job on CPU: the torchrun harness with 2 gloo processes, end to end.

One short run covers what `bash launch/run.sh` does on a machine without a GPU: the check of
every rank against the single-process layer and the float64 reference (both dispatchers), then
the timings and the JSON report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]


def test_harness_checks_times_and_reports(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "launch" / "harness.py"), "--preset", "tiny", "--tokens", "24",
           "--iters", "1", "--dispatcher", "both", "--rounds", "2"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("all_to_all", "allgather"):
        assert f"check {name}: OK" in proc.stdout, proc.stdout[-3000:]
    report = json.loads((tmp_path / "harness_tiny_W2.json").read_text())
    assert report["W"] == 2 and report["backend"] == "gloo"
    for kind, errors in report["checks"].items():
        assert all(v < 1e-4 for v in errors.values()), (kind, errors)
    runs = {run["dispatcher"]: run["per_rank"] for run in report["runs"]}
    assert set(runs) == {"all_to_all", "allgather"} and all(len(r) == 2 for r in runs.values())
    a2a = runs["all_to_all"][0]
    for key in ("fwd_ms", "fwd_bwd_ms", "per_gpu_vs_single_fwd",
                "dispatch_ms", "combine_ms", "dispatch_exchange_ms", "dispatch_vs_raw"):
        assert a2a[key] > 0, key
    assert len(a2a["per_gpu_vs_single_fwd_rounds"]) == 2  # one paired ratio per round
    for run in report["runs"]:  # the summary: the median over both ranks' rounds
        pooled = sorted(v for r in run["per_rank"] for v in r["per_gpu_vs_single_fwd_rounds"])
        assert len(pooled) == 4
        assert run["summary"]["per_gpu_vs_single_fwd_median"] == (pooled[1] + pooled[2]) / 2
    # every rank sends its copies and gets the same number of rows back in total
    assert sum(r["rows_sent"] for r in runs["all_to_all"]) == \
        sum(r["rows_received"] for r in runs["all_to_all"])
