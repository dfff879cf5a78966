#!/usr/bin/env bash
# One GPU: the layer's per-expert products after a host sync against torch's grouped GEMM
# (launch/probe_hostloop.py), then the experts' tests on the GPU. Everything in $OUT/hostloop.tgz.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
timeout ${PROBE_TIMEOUT:-300} python3 launch/probe_hostloop.py ${ARGS:-} 2>&1 \
  | tee "$OUT/probe_hostloop.log" | tail -20
timeout ${TEST_TIMEOUT:-120} python3 -m pytest -q -x tests/test_experts.py tests/test_layer.py \
  > "$OUT/pytest_gpu.log" 2>&1
tail -3 "$OUT/pytest_gpu.log"
tar czf "$FINAL/hostloop.tgz" -C "$OUT" .
