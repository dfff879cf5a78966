#!/usr/bin/env bash
# One GPU: per-expert cuBLAS products against torch's grouped GEMM and ours, the experts'
# training step both ways, the router top-k's backward (launch/probe_loop.py).
# Log and JSON: $OUT/loop.tgz.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
timeout ${PROBE_TIMEOUT:-420} python3 launch/probe_loop.py ${ARGS:-} 2>&1 | tee "$OUT/probe_loop.log" | tail -60
tar czf "$FINAL/loop.tgz" -C "$OUT" .
