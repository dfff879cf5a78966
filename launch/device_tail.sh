#!/usr/bin/env bash
# One GPU: tail tiles in the grouped GEMM against full-height blocks (launch/probe_tail.py).
# Log and JSON: $OUT/tail.tgz.
source "$(dirname "$0")/device_env.sh"
timeout ${PROBE_TIMEOUT:-420} python3 launch/probe_tail.py ${ARGS:-} 2>&1 | tee "$OUT/probe_tail.log" | tail -45
tar czf "$FINAL/tail.tgz" -C "$OUT" .
