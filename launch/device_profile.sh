#!/usr/bin/env bash
# One GPU: where the layer's time goes (launch/profile_layer.py ARGS), e.g. the training step
# with --backward. Tables in $OUT/profile.tgz.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
timeout ${PROBE_TIMEOUT:-240} python3 launch/profile_layer.py ${ARGS:-} 2>&1 \
  | tee "$OUT/profile_layer.log" | tail -40
tar czf "$FINAL/profile.tgz" -C "$OUT" .
