#!/usr/bin/env bash
# Every GPU: kernel timelines of the expert-parallel forward's CUDA-graph replays
# (launch/probe_pipeline.py ARGS, default Qwen3, 8192 tokens per GPU, 1 and 3 chunks).
# Per-rank JSON in $OUT/pipeline.tgz.
source "$(dirname "$0")/device_env.sh"
nvidia-smi -L > "$OUT/gpus.txt"
timeout ${PROBE_TIMEOUT:-300} python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
  launch/probe_pipeline.py ${ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/probe_pipeline.log" | tail -20
tar czf "$FINAL/pipeline.tgz" -C "$OUT" .
