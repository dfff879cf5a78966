#!/usr/bin/env bash
# One GPU: the flattened persistent grouped GEMM (launch/probe_flat.py): a smoke run of every
# variant on one small case in its own process under a timeout (a pipeliner hang costs that
# much only), then the timed run. Logs and JSON: $OUT/flat.tgz.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
timeout ${SMOKE_TIMEOUT:-150} python3 launch/probe_flat.py --smoke --presets qwen3 --tokens 512 \
  > "$OUT/smoke.log" 2>&1; echo "smoke rc $?" | tee -a "$OUT/smoke.log"; tail -3 "$OUT/smoke.log"
if grep -q "smoke rc 0" "$OUT/smoke.log"; then
  timeout ${PROBE_TIMEOUT:-400} python3 launch/probe_flat.py ${ARGS:-} 2>&1 | tee "$OUT/probe_flat.log" | tail -90
fi
tar czf "$FINAL/flat.tgz" -C "$OUT" .
