#!/usr/bin/env bash
# Raw all-to-all bus bandwidth on every GPU under a few NCCL settings (each needs a fresh
# communicator, so a fresh torchrun); then the Qwen3 fixed-exchange harness (8192 tokens per
# GPU, CUDA graphs) without any setting and under the one fastest at 128 MiB. One archive,
# results${TAG}.tgz, under $OUT.
source "$(dirname "$0")/device_env.sh"  # cd, PYTHONPATH, FINAL, OUT, n
probe() {  # probe NAME [VAR=VALUE ...]
  local name=$1; shift
  env "$@" timeout 90 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
    launch/probe_a2a.py "$name" 2>&1 | grep -v -i warn | grep "busbw\|Error"
}
probe default
declare -A SETTINGS=([min_ch32]="NCCL_MIN_NCHANNELS=32"
  [p2p_ch32]="NCCL_MIN_P2P_NCHANNELS=32 NCCL_MAX_P2P_NCHANNELS=32"
  [nvl_chunk1m]="NCCL_P2P_NVL_CHUNKSIZE=1048576"
  [nvl_chunk2m_buf]="NCCL_P2P_NVL_CHUNKSIZE=2097152 NCCL_BUFFSIZE=16777216"
  [proto_simple]="NCCL_PROTO=Simple")
for name in "${!SETTINGS[@]}"; do probe "$name" ${SETTINGS[$name]}; done
tar czf "$FINAL/results${TAG:-}.tgz" -C "$OUT" .
best=$(python3 - "$OUT" <<'PY'
import glob, json, sys
runs = [json.load(open(f)) for f in glob.glob(sys.argv[1] + "/a2a_*.json")]
print(max(runs, key=lambda r: r["busbw_gbs_128MiB"])["name"])
PY
)
echo "fastest at 128 MiB: $best"
harness() {
  local name=$1; shift
  env "$@" timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
    launch/harness.py --json "$name.json" --preset qwen3 --tokens 8192 --fixed --graph \
    --rounds 3 2>&1 | grep -v -i warn | tee "$OUT/$name.log" | grep "^| all\|Error"
  tar czf "$FINAL/results${TAG:-}.tgz" -C "$OUT" .
}
harness qwen3_fixed_default
[ "$best" != default ] && harness "qwen3_fixed_$best" ${SETTINGS[$best]}
