#!/usr/bin/env bash
# One GPU: Mixtral's tile shapes against gemm_config's (launch/probe_waves.py). $OUT/waves.tgz.
source "$(dirname "$0")/device_env.sh"
timeout ${PROBE_TIMEOUT:-300} python3 launch/probe_waves.py ${ARGS:-} 2>&1 \
  | tee "$OUT/probe_waves.log" | tail -90
tar czf "$FINAL/waves.tgz" -C "$OUT" .
