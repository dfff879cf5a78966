#!/usr/bin/env bash
# One GPU: the flattened persistent grouped GEMM (launch/probe_flat.py).
#   default: a smoke run of every variant on one small case in its own process under a
#            timeout (a pipeliner hang costs that much only), then the timed sweep;
#   MODE=layer: the shipped policy on and off (down projection, layer forward), then the GPU
#            tests of TESTS. Logs and JSON: $OUT/flat.tgz.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
if [ "${MODE:-sweep}" = layer ]; then
  timeout ${PROBE_TIMEOUT:-300} python3 launch/probe_flat.py --layer ${ARGS:-} 2>&1 \
    | tee "$OUT/probe_flat_layer.log" | tail -12
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_grouped_gemm.py} \
    2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
else
  timeout ${SMOKE_TIMEOUT:-150} python3 launch/probe_flat.py --smoke --presets qwen3 --tokens 512 \
    > "$OUT/smoke.log" 2>&1; echo "smoke rc $?" | tee -a "$OUT/smoke.log"; tail -3 "$OUT/smoke.log"
  if grep -q "smoke rc 0" "$OUT/smoke.log"; then
    timeout ${PROBE_TIMEOUT:-400} python3 launch/probe_flat.py ${ARGS:-} 2>&1 | tee "$OUT/probe_flat.log" | tail -90
  fi
fi
tar czf "$FINAL/flat.tgz" -C "$OUT" .
