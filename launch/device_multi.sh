#!/usr/bin/env bash
# One device call on a multi-GPU machine: the harness at W = all GPUs and W = 2, for the Mixtral
# and Qwen3 shapes, both dispatchers. Logs and JSON under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
tokens=${TOKENS:-8192}
for w in $(echo "$n 2" | tr ' ' '\n' | sort -ru); do
  for preset in mixtral qwen3; do
    python3 -m torch.distributed.run --standalone --nproc-per-node "$w" launch/harness.py \
      --preset "$preset" --tokens "$tokens" --dispatcher both "$@" 2>&1 \
      | grep -v -i "warn" | tee "$OUT/harness_${preset}_W${w}.log"
  done
done
