#!/usr/bin/env bash
# One GPU: Mixtral's tile shapes against gemm_config's (launch/probe_waves.py); MODE=layer: the
# layer with stop 17's configs and stop 16's in turn. $OUT/waves.tgz.
source "$(dirname "$0")/device_env.sh"
timeout ${PROBE_TIMEOUT:-300} python3 launch/probe_waves.py ${ARGS:-} \
  $([ "${MODE:-}" = layer ] && echo --layer) 2>&1 \
  | tee "$OUT/probe_waves.log" | tail -90
tar czf "$FINAL/waves.tgz" -C "$OUT" .
