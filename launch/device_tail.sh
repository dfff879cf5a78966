#!/usr/bin/env bash
# One GPU: tail tiles in the grouped GEMM against full-height blocks (launch/probe_tail.py).
#   default: the GEMM sweep;  MODE=layer: the layer with tails on and off (ARGS), then the
#   GPU tests of TESTS.  Logs and JSON: $OUT/tail.tgz.
source "$(dirname "$0")/device_env.sh"
if [ "${MODE:-sweep}" = layer ]; then
  timeout ${PROBE_TIMEOUT:-240} python3 launch/probe_tail.py --layer ${ARGS:-} 2>&1 \
    | tee "$OUT/probe_tail_layer.log" | tail -8
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider \
    ${TESTS:-tests/test_grouped_gemm.py} 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
else
  timeout ${PROBE_TIMEOUT:-420} python3 launch/probe_tail.py ${ARGS:-} 2>&1 | tee "$OUT/probe_tail.log" | tail -45
fi
tar czf "$FINAL/tail.tgz" -C "$OUT" .
