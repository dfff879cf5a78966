#!/usr/bin/env bash
# One GPU: the tests in TESTS (default tests/), optionally those matching K (pytest -k), under
# TEST_TIMEOUT seconds. Log in $OUT/tests.tgz.
source "$(dirname "$0")/device_env.sh"
nvidia-smi -L > "$OUT/gpus.txt"
CUDA_VISIBLE_DEVICES=0 timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider \
  -m "not distributed" ${TESTS:-tests/} ${K:+-k "$K"} > "$OUT/pytest_gpu.log" 2>&1
tail -5 "$OUT/pytest_gpu.log"
tar czf "$FINAL/tests.tgz" -C "$OUT" .
