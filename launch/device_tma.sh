#!/usr/bin/env bash
# One GPU: the grouped GEMM's descriptor (TMA) loads against pointer loads, then the GEMM tests
# (STEP=probe); a wider tile sweep with them and the persistent probe (STEP=sweep); or the
# single-GPU layer benchmark with the default loads (STEP=layer), after the one-process
# tests (STEP=full); the host time of the launches (STEP=host); kernel profiles (STEP=profile).
# Logs and JSON packed into $OUT/tma_${STEP}.tgz.
source "$(dirname "$0")/device_env.sh"
case "${STEP:-probe}" in
  probe)
    python3 -c 'import triton; print("triton", triton.__version__)' | tee "$OUT/versions.log"
    timeout 420 python3 launch/probe_tma.py 2>&1 | tee "$OUT/probe_tma.log"
    timeout 150 python3 -m pytest -q -x tests/test_grouped_gemm.py -p no:cacheprovider 2>&1 \
      | tail -8 | tee "$OUT/pytest_gemm.log" ;;
  sweep)  # more tiles with descriptor loads; the persistent launch over a bound, with them
    timeout 400 python3 launch/probe_tma.py --sweep ${SWEEP:-wide} \
      --presets ${PRESETS:-qwen3 mixtral} --tokens ${TOKENS:-512 4096 8192 16384} 2>&1 \
      | tee "$OUT/probe_tma_${SWEEP:-wide}.log"
    [ "${SWEEP:-wide}" = wide ] && timeout 150 python3 launch/probe_persistent.py 2>&1 \
      | tee "$OUT/probe_persistent.log" ;;
  full)  # every test that runs in one process, then the layer benchmark
    timeout 330 python3 -m pytest -q -m "not distributed" tests/ -p no:cacheprovider 2>&1 \
      | tail -15 | tee "$OUT/pytest_gpu.log"
    timeout 240 python3 launch/bench_layer.py --tokens ${TOKENS:-16 512 4096 16384} 2>&1 \
      | tee "$OUT/bench_layer.log" ;;
  host)  # host time of the launches, descriptor loads against pointer loads
    timeout 300 python3 launch/probe_host.py 2>&1 | tee "$OUT/probe_host.log" ;;
  profile)  # where a training step's forward+backward spends its time, and an inference forward's
    timeout 200 python3 launch/profile_layer.py --backward --tokens ${TOKENS:-512 4096 16384} \
      2>&1 | tee "$OUT/profile_bwd.log"
    timeout 120 python3 launch/profile_layer.py --tokens ${TOKENS:-512 4096 16384} 2>&1 \
      | tee "$OUT/profile_fwd.log" ;;
  layer)
    timeout 560 python3 launch/bench_layer.py --tokens ${TOKENS:-512 4096 16384} 2>&1 \
      | tee "$OUT/bench_layer.log" ;;
esac
tar czf "$FINAL/tma_${STEP:-probe}.tgz" -C "$OUT" .
