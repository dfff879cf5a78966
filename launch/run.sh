#!/usr/bin/env bash
# The main job: the harness on every GPU this machine has (NCCL), or on 2 CPU processes (gloo).
# Extra arguments go to launch/harness.py (e.g. --preset qwen3 --dispatcher both).
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "${gpus}" -gt 0 ]; then
  nproc=${gpus}
else
  nproc=2
  export TRITON_INTERPRET=1  # CPU: the Triton kernels run under the interpreter
fi
exec python3 -m torch.distributed.run --standalone --nproc-per-node "${nproc}" \
  launch/harness.py "$@"
