#!/usr/bin/env bash
# Stop 17's first multi-GPU call: per-expert cuBLAS against torch's grouped GEMM on GPU 0 at
# Mixtral's rows per expert of one GPU (8192 tokens) and of a rank at W = 4 (32768 tokens on
# one GPU: 8192 rows an expert), then device_fixed.sh SET=final17 on every GPU.
d="$(dirname "$0")"
CUDA_VISIBLE_DEVICES=0 ARGS="--presets mixtral --tokens 8192 32768 --train-tokens 1" \
  PROBE_TIMEOUT=150 bash "$d/device_loop.sh"
SET=${SET:-final17} bash "$d/device_fixed.sh"
