"""The launch/ tools run end to end on the CPU, at tiny sizes, as a user would start them.

Each test runs one tool in a subprocess with no GPU visible (TRITON_INTERPRET=1: the Triton
kernels under the interpreter), its output folder in a temporary directory, and reads what it
printed and wrote: the checks passed before any timing, the tables, the JSON. The times mean
nothing on the CPU; only that every path runs and reports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def run_tool(args: list[str], out: Path, timeout: int = 300) -> str:
    """Run a launch/ script (python, or bash for .sh) on the CPU with $OUT = out; its stdout
    (it must exit 0)."""
    env = dict(os.environ, OUT=str(out), TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    program = ["bash"] if args[0].endswith(".sh") else [sys.executable]
    proc = subprocess.run(program + args, env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [rows[0]] + rows[2:]  # header, then the body (no |---| line)


def matplotlib_installed() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.distributed
def test_harness_first_screen_and_plot(tmp_path):
    """`bash launch/run.sh` without a GPU: 2 gloo ranks check against the single-process layer
    and the float64 reference, then time; rank 0 prints a table that fits a terminal, the JSON
    holds every rank's figures, and --plot writes the phases' PNG (or says matplotlib is
    missing). --fp8 adds the FP8 experts' check and a line: e4m3 rows out, forward only."""
    out = run_tool([str(LAUNCH / "run.sh"), "--preset", "tiny", "--tokens", "24", "--iters", "1",
                    "--rounds", "1", "--plot", "--fp8"], tmp_path)
    check_at = out.index("check all_to_all: OK")
    rows = table_rows(out, "| run |")
    assert check_at < out.index("| run |")  # the check comes first
    header, body = rows[0], rows[1:]
    header_line = next(line for line in out.splitlines() if line.startswith("| run |"))
    assert len(header) <= 10 and len(header_line) < 120  # fits a terminal
    assert [row[:2] for row in body] == [["all_to_all, exact", "2"],
                                         ["all_to_all, exact, FP8 experts", "2"]]
    cells, fp8_cells = (dict(zip(header, row)) for row in body)
    for name in ("tokens/s", "fwd ms", "step ms", "fwd vs 1 GPU", "step vs 1 GPU"):
        assert float(cells[name]) > 0, name
    for name in ("tokens/s", "fwd ms", "fwd vs 1 GPU"):
        assert float(fp8_cells[name]) > 0, name
    assert fp8_cells["step ms"] == ""  # FP8 experts are for inference
    for row in (cells, fp8_cells):
        assert re.fullmatch(r"[0-9.]+ / [0-9.]+", row["exchange vs raw"])
    assert "all_to_all, exact, FP8 experts: forward" in out

    report = json.loads((tmp_path / "harness_tiny_W2.json").read_text())
    assert report["W"] == 2 and report["backend"] == "gloo"
    assert {"device", "date", "torch", "triton"} <= set(report)
    checks = report["checks"]["all_to_all"]
    assert checks["fp8_out_vs_fp64"] < 1e-2
    assert all(v < 1e-4 for k, v in checks.items() if k != "fp8_out_vs_fp64"), checks
    (run,) = report["runs"]
    per_rank = run["per_rank"]
    # D 128 (raised for the FP8 blocks), K 2: a row out is D + D / 32 + 8K bytes as FP8 (160
    # padded to 16), 4D + 8K in fp32 (528); the same rows go out either way
    for r in per_rank:
        assert r["fp8_rows_sent"] == r["rows_sent"]
        assert r["fp8_dispatch_bytes"] == 160 * r["rows_sent"]
        assert r["dispatch_bytes"] == 528 * r["rows_sent"]
        assert r["fp8_dispatch_bytes_vs_bf16"] == pytest.approx(160 / 528)
    assert len(per_rank) == 2
    assert per_rank[0]["plan_inference"]["exchange"] == "exact"
    assert per_rank[0]["plan_training"]["grad"] is True
    for key in ("fwd_ms", "fwd_bwd_ms", "route_ms", "dispatch_ms", "experts_ms", "combine_ms",
                "dispatch_exchange_ms", "dispatch_vs_raw", "per_gpu_vs_single_fwd"):
        assert all(r[key] > 0 for r in per_rank), key
    # the summary: each ratio's median over both ranks' rounds
    pooled = sorted(r["per_gpu_vs_single_fwd_rounds"][0] for r in per_rank)
    assert run["summary"]["per_gpu_vs_single_fwd_median"] == pytest.approx(sum(pooled) / 2)
    # every rank sends its copies and gets the same number of rows back in total
    assert sum(r["rows_sent"] for r in per_rank) == sum(r["rows_received"] for r in per_rank)

    png = tmp_path / "harness_tiny_W2_phases.png"
    if matplotlib_installed():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "--plot needs matplotlib" in out and not png.exists()


def test_bench_layer(tmp_path):
    """ep_moe eager and compiled (fullgraph) beside transformers' grouped_mm block and the
    floor, every path checked against float64 before the tables."""
    out = run_tool([str(LAUNCH / "bench_layer.py"), "--presets", "tiny", "--tokens", "16"],
                   tmp_path)
    assert out.index("tiny T=16: checked") < out.index("forward (no grad)") \
        < out.index("training step")
    fwd = table_rows(out, "| shape |")
    assert fwd[0][3:] == ["floor", "ep_moe eager", "ep_moe compiled", "compiled / eager",
                          "transformers grouped_mm", "grouped_mm / eager"]
    report = json.loads((tmp_path / "bench_layer.json").read_text())
    assert report["copy_ceiling_gbs"] > 0 and report["matmul_ceiling_tflops"] > 0
    (row,) = report["rows"]
    assert row["preset"] == "tiny" and row["T"] == 16 and row["floor_ms"] > 0
    for name in ("eager", "compiled", "grouped_mm"):
        assert row[f"{name}_err_vs_fp64"] < 2e-2, name
        assert row[f"{name}_ms"] > 0 and row[f"train_{name}_ms"] > 0, name
    assert row["compiled_over_eager"] == pytest.approx(row["compiled_ms"] / row["eager_ms"])


def test_bench_layer_fp8(tmp_path):
    """--fp8: the layer with e4m3 experts checked against the float64 reference of the same
    quantization, timed beside bf16 eager, and its table (the tiny preset raised to D = I =
    128 for the scale blocks)."""
    out = run_tool([str(LAUNCH / "bench_layer.py"), "--presets", "tiny", "--tokens", "16",
                    "--variants", "eager", "--fp8"], tmp_path)
    assert "D, I = 128, 128" in out
    fwd = table_rows(out, "| shape |")
    assert "ep_moe compiled" not in fwd[0] and "transformers grouped_mm" not in fwd[0]
    fp8 = table_rows(out, "| shape | T | FP8 floor |")
    assert fp8[0][3:6] == ["ep_moe FP8", "FP8 / floor", "ep_moe bf16"]
    (row,) = json.loads((tmp_path / "bench_layer.json").read_text())["rows"]
    assert row["fp8_err_vs_fp64"] < 2e-2 and 0 < row["fp8_err_vs_bf16"] < 0.12
    assert row["fp8_ms"] > 0 and "train_fp8_ms" not in row
    # half the weight bytes; the same FLOPs at the CPU's bf16 ceiling (no FP8 matmul there)
    assert 0 < row["fp8_floor_ms"] <= row["floor_ms"]
    assert row["eager_over_fp8"] == pytest.approx(row["eager_ms"] / row["fp8_ms"])


def test_bench_combine(tmp_path):
    """The combine's check (NaN-poisoned outputs and skipped slots) and its table, tiny rows."""
    out = run_tool([str(LAUNCH / "bench_combine.py")], tmp_path)
    assert out.count("checked and timed") == 4
    rows = table_rows(out, "| T, K, D |")
    assert len(rows) == 5 and rows[0][4] == "ours us (x2)"
    report = json.loads((tmp_path / "bench_combine.json").read_text())
    assert report["device"] == "cpu" and len(report["rows"]) == 4
    assert all(len(r["ours_us"]) == 2 and r["bytes_moved"] > 0 for r in report["rows"])


def test_profile_layer(tmp_path):
    """The per-op profile of a forward, written as a text report."""
    out = run_tool([str(LAUNCH / "profile_layer.py"), "--presets", "tiny", "--tokens", "16"],
                   tmp_path)
    text = (tmp_path / "profile_layer.txt").read_text()
    assert "## tiny T=16:" in text and "## tiny T=16:" in out
    assert re.search(r"^\s+[0-9.]+ us\s+[0-9.]+%\s+x\d+\s+\S", text, re.MULTILINE)
