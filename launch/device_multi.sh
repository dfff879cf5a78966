#!/usr/bin/env bash
# One device call on a multi-GPU machine. Stages (each under its own time limit):
#   1. GPU tests, then the single-GPU layer benchmark, on GPU 0;
#   2. the harness at W = all GPUs, Mixtral and Qwen3 shapes,
#      with a profile of a few forwards;
#   3. the same at W = 2 when the machine has more GPUs.
# Everything lands in two archives under $OUT (the device tool brings back few files), named
# with $TAG so that several invocations in one call keep theirs. WS lists the world sizes,
# PRESETS the shapes; extra arguments go to the harness.
source "$(dirname "$0")/device_env.sh"  # cd, PYTHONPATH, FINAL, OUT, n
tokens=${TOKENS:-8192}
pack() {  # after every stage, so a stage cut off by the call's limit loses only itself
  mkdir -p "$OUT/traces"; mv "$OUT"/*.trace.json "$OUT/traces/" 2>/dev/null
  tar czf "$FINAL/traces${TAG:-}.tgz" -C "$OUT" traces
  tar czf "$FINAL/results${TAG:-}.tgz" -C "$OUT" --exclude traces .
}
nvidia-smi -L > "$OUT/gpus.txt"
python3 launch/gpu_probe.py > "$OUT/probe.log" 2>&1
if [ "${SKIP_TESTS:-0}" != 1 ]; then  # TEST_FILES picks a subset
  CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -q -x -m "not distributed" \
    ${TEST_FILES:-tests/} > "$OUT/pytest_gpu.log" 2>&1
  tail -3 "$OUT/pytest_gpu.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then  # alone on the machine: eager timings are host-bound
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 launch/bench_layer.py > "$OUT/bench_layer.log" 2>&1
  tail -10 "$OUT/bench_layer.log"
fi
pack
for w in ${WS:-$(echo "$n ${ALSO_W:-2}" | tr ' ' '\n' | sort -ru)}; do
  for preset in ${PRESETS:-mixtral qwen3}; do
    timeout "${HARNESS_TIMEOUT:-150}" python3 -m torch.distributed.run --standalone \
      --nproc-per-node "$w" launch/harness.py --preset "$preset" --tokens "$tokens" \
      --profile "$@" 2>&1 | grep -v -i "warn" \
      | tee "$OUT/harness_${preset}_W${w}.log" | grep -v "^|---"
    pack
  done
done
ls -la "$FINAL"
