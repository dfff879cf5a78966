#!/usr/bin/env bash
# One device call on one GPU: probe, GPU tests, combine and layer benchmarks. Logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 launch/gpu_probe.py 2>&1 | tee "$OUT/probe.log"
python3 -m pytest -q -x -m gpu tests/ 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
python3 launch/bench_combine.py 2>&1 | tee "$OUT/bench_combine.log"
python3 launch/bench_layer.py "$@" 2>&1 | tee "$OUT/bench_layer.log"
