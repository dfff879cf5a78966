#!/usr/bin/env bash
# One GPU, stop 16's last call: the GPU tests not reached in m44 (TESTS), then the single-GPU
# layer benchmark on the final code (bench_layer.py). Logs and JSON: $OUT/layer16.tgz.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider \
  ${TESTS:-tests/test_gpu_layer.py tests/test_topk.py} 2>&1 | tail -8 | tee "$OUT/pytest_gpu.log"
timeout ${BENCH_TIMEOUT:-400} python3 launch/bench_layer.py ${ARGS:-} 2>&1 | tee "$OUT/bench_layer.log" | tail -40
tar czf "$FINAL/layer16.tgz" -C "$OUT" .
