#!/usr/bin/env bash
# One GPU: the router's top-k kernel against torch's, alone and in the layer's forward
# (launch/probe_router.py), then the tests of the router, the layer and interop on the GPU
# (TESTS: other files; MARK: a pytest -m expression, e.g. "not distributed" with TESTS=tests/).
# Logs and JSON: $OUT/router.tgz.
source "$(dirname "$0")/device_env.sh"
timeout 300 python3 launch/probe_router.py 2>&1 | tee "$OUT/probe_router.log" | tail -20
timeout ${TEST_TIMEOUT:-250} python3 -m pytest -q -p no:cacheprovider ${MARK:+-m "$MARK"} \
  ${TESTS:-tests/test_topk.py tests/test_router.py \
  tests/test_interop.py tests/test_layer.py tests/test_gpu_layer.py tests/test_edge_cases.py} \
  2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
tar czf "$FINAL/router.tgz" -C "$OUT" .
