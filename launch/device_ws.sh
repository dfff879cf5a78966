#!/usr/bin/env bash
# One GPU: Triton's automatic warp specialisation on Hopper (launch/probe_ws.py). Each variant
# first runs a small case in its own process under `timeout` (a warp-specialised kernel that
# deadlocks hangs its process: on triton 3.6 every one did), then the variants that finished
# are timed against the library's grouped GEMM and torch's. Logs and JSON: $OUT/ws.tgz.
source "$(dirname "$0")/device_env.sh"
ok=""
for v in nows skip0 skip1 pers; do
  good=1
  for g in 1 2; do
    timeout 45 python3 launch/probe_ws.py --smoke $v --gemm $g 2>&1 | grep -E "smoke|Error" \
      | tail -2 | tee -a "$OUT/smoke.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "smoke $v gemm $g FAILED" | tee -a "$OUT/smoke.log"; good=0; }
  done
  [ $good = 1 ] && ok="$ok $v"
done
echo "timing variants:$ok"
timeout 400 python3 launch/probe_ws.py --variants $ok --tokens ${TOKENS:-4096 16384 512} 2>&1 \
  | tee "$OUT/probe_ws.log" | grep -v "checked" | tail -80
tar czf "$FINAL/ws.tgz" -C "$OUT" .
