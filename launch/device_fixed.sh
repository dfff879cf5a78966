#!/usr/bin/env bash
# One device call for the fixed-size exchange (MoEConfig.max_tokens_per_rank), every GPU:
# GPU tests of the changed kernels, then harness variants, each checked against the
# single-process layer before it is timed. SET picks the variants:
#   qwen3:  exact split sizes, fixed, fixed in 2 and 4 chunks (8192 tokens per GPU)
#   qwen3_hp: fixed again, then fixed in 1, 2 and 4 chunks with NCCL's streams at high priority
#   mixtral: exact, fixed in 2 chunks (8192)
#   decode: Qwen3 and Mixtral at 64 tokens per GPU, exact and fixed, CUDA-graph replays
#   final: qwen3 and mixtral, exact and fixed, at 8192 and 64 tokens per GPU
#   recheck: qwen3 exact and fixed, mixtral fixed (8192), qwen3 fixed at 64
#   final11: Qwen3 fixed in 1 and 3 chunks (8192), fixed at 64, Mixtral exact (8192)
#   step: Mixtral and Qwen3 exact (8192), forward+backward timed as training steps
#   final12: final11 and step together (stop 12's code; the first thing to run at W = 4)
#   final15: Qwen3 fixed in 3 chunks, Mixtral exact (8192), Qwen3 fixed at 64, and
#            examples/hf_expert_parallel.py on every GPU
#   reserve: Qwen3 fixed in 3 and 2 chunks with package variants carried under .var/NAME
#            (VARIANTS: each a `git archive` of ep_moe with one change, e.g. stop 13's grid
#            launch or a persistent one leaving 16 SMs free) against this checkout
#   channels: Qwen3 fixed, in 3 chunks, in 3 chunks with NCCL at high priority, under
#             NCCL_MAX_P2P_NCHANNELS 16 and 8, and in 3 chunks again
#   final17: Qwen3 fixed in 3 chunks and in 1 (the flattened down projection runs there),
#            Mixtral exact (8192)
#   loop17: Mixtral exact (8192) with one cuBLAS product per expert (this checkout) and with
#           torch's grouped GEMM (.var/grouped: the package before it), in turn, twice; then
#           the same once at W = 2
#   sized18: Qwen3 fixed, the chunks' GEMMs launched for the expected rows (.var/sized18:
#            `git archive 5a9edd9 ep_moe`, branch exp/sized-launch) against the grid over
#            the bound (this checkout), in 3 chunks twice and in 2 once, in turn; one chunk
#            against .var/sized_c1 (that package with the one chunk's gate/up GEMM sized too:
#            `persistent = [False, True]` and `expected_rows` in its not-overlapped branch);
#            then probe_pipeline.py's kernel timelines of .var/sized18
#   flat18: Qwen3 fixed in 3 chunks, the chunks' down projection as a flattened persistent
#           loop (.var/flat: `git archive 1e70d94 ep_moe`) on every SM and on 16 and 32
#           fewer (EP_MOE_RESERVE_SMS), between two runs of .var/sized18; then
#           probe_pipeline.py's timelines with 16 fewer
#   home18: Qwen3 fixed, one chunk with this rank's own rows kept home (.var/home: `git archive
#           20e4af3 ep_moe`, branch exp/home-split, with EP_MOE_HOME_SPLIT=1: half of them
#           beside the rows' exchange, half beside the partials') against 3 tapered chunks and
#           one plain chunk (this checkout), in turn, twice; then probe_pipeline.py's timelines
#           of the home split
#   home18c: the same home split (.var/home) with 3 tapered chunks (the first chunk's own
#            rows beside the first rows' exchange, the others' beside the last partials')
#            against 3 chunks and the one-chunk home split, in turn, twice; then the
#            timelines of both
#   loop18: loop17 shortened to the device time left: per-expert, grouped, per-expert, at W = n
#   streams19: Qwen3 fixed in 3 chunks, stop 19's side streams (.var/streams: `git archive
#              exp/side-streams ep_moe`): each chunk's sort on a high-priority side stream and
#              its slot reduction on another (EP_MOE_PIPE_STREAMS=2), the sort only (1) and
#              neither (0: stop 18's pipeline), in turn, twice; then probe_pipeline.py's
#              timelines of 2
#   pairs19: Mixtral exact (8192 tokens per GPU): stop 19's pair dispatcher (.var/pairs: `git
#            archive exp/pairs ep_moe`; all_to_all_pairs: a row per (token, expert), one
#            exchange per local expert, each expert's GEMMs beside the next one's rows and the
#            last one's outputs) against all_to_all, in turn, twice at W = n, then once each
#            at W = 2 (the harness of that branch: `git show exp/pairs:launch/harness.py`)
#   nvlink20: Qwen3 fixed over NVLink (MoEConfig.exchange="nvlink") in 1 and 3 chunks against
#             NCCL's in 3 and 1, in turn; then Mixtral fixed over NVLink
#   nvlink20b: probe_pipeline.py's timelines of the NVLink exchange in 1, 2 and 3 chunks (the
#              pipeline's send kernel on 32, 264 and all programs), then NCCL's in 1 and 3
#   nvlink20c: the NVLink exchange's check and timelines (1 and 3 chunks), then Qwen3 over
#              NVLink in one chunk against NCCL's 3 chunks, in turn, twice
#   mixtral20: Mixtral exact (8192 tokens per GPU) twice
#   pipeline: fixed in QWEN3_CHUNKS (1 2 3 4) and MIXTRAL_CHUNKS (1 2 4) chunks, 8192 tokens
# The fixed variants also time CUDA-graph replays. One archive, results${TAG}.tgz, under $OUT.
source "$(dirname "$0")/device_env.sh"  # cd, PYTHONPATH, FINAL, OUT, n
pack() { tar czf "$FINAL/results${TAG:-}.tgz" -C "$OUT" .; }
harness() {  # harness NAME ARGS...: one run at W = n, its table printed, its JSON kept
  local name=$1; shift
  timeout "${HARNESS_TIMEOUT:-150}" python3 -m torch.distributed.run --standalone \
    --nproc-per-node "${NPROC:-$n}" launch/harness.py --json "$name.json" "$@" 2>&1 \
    | grep -v -i "warn" | tee "$OUT/$name.log" | grep "^| \|check\|Error\|error" | grep -v "^|---"
  pack
}
home() {  # home CMD...: CMD with stop 18's home split (.var/home, branch exp/home-split)
  EP_MOE_HOME_SPLIT=1 PYTHONPATH="$PWD/.var/home:$PYTHONPATH" "$@"
}
nvidia-smi -L > "$OUT/gpus.txt"
if [ -n "${TEST_FILES:-}" ]; then
  CUDA_VISIBLE_DEVICES=0 timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x -m "not distributed" \
    $TEST_FILES > "$OUT/pytest_gpu.log" 2>&1
  tail -3 "$OUT/pytest_gpu.log"
  pack
fi
for set in ${SET:-qwen3}; do
  case $set in
    qwen3)
      harness qwen3_exact --preset qwen3 --tokens 8192 --graph
      harness qwen3_fixed --preset qwen3 --tokens 8192 --fixed --graph
      harness qwen3_fixed_c2 --preset qwen3 --tokens 8192 --fixed --chunks 2 --graph
      harness qwen3_fixed_c4 --preset qwen3 --tokens 8192 --fixed --chunks 4 --graph ;;
    qwen3_hp)  # NCCL on high-priority streams: its blocks start ahead of queued GEMM blocks
      harness qwen3_fixed_again --preset qwen3 --tokens 8192 --fixed --graph
      TORCH_NCCL_HIGH_PRIORITY=1 harness qwen3_fixed_hp --preset qwen3 --tokens 8192 --fixed --graph
      TORCH_NCCL_HIGH_PRIORITY=1 harness qwen3_fixed_c2_hp --preset qwen3 --tokens 8192 --fixed \
        --chunks 2 --graph
      TORCH_NCCL_HIGH_PRIORITY=1 harness qwen3_fixed_c4_hp --preset qwen3 --tokens 8192 --fixed \
        --chunks 4 --graph ;;
    final12)  # stop 12's code at W = n: Qwen3 fixed in 1 and 3 chunks (graph), decode, and the
      # exact exchange's forwards and training steps for both shapes
      harness qwen3_fixed_c1 --preset qwen3 --tokens 8192 --fixed --graph
      harness qwen3_fixed_c3 --preset qwen3 --tokens 8192 --fixed --chunks 3 --graph
      harness qwen3_fixed_T64 --preset qwen3 --tokens 64 --fixed --graph
      harness mixtral_exact --preset mixtral --tokens 8192
      harness qwen3_exact --preset qwen3 --tokens 8192 ;;
    reserve)  # does a persistent GEMM that holds every SM keep NCCL's blocks out?
      for c in ${RESERVE_CHUNKS-3 2}; do
        harness qwen3_fixed_c${c}_base --preset qwen3 --tokens 8192 --fixed --chunks $c --graph
        for v in ${VARIANTS:-}; do
          PYTHONPATH="$PWD/.var/$v:$PYTHONPATH" harness qwen3_fixed_c${c}_$v --preset qwen3 \
            --tokens 8192 --fixed --chunks $c --graph
        done
      done ;;
    step)  # forward+backward as a training step (gradients from None), exact exchange
      harness mixtral_exact --preset mixtral --tokens 8192
      harness qwen3_exact --preset qwen3 --tokens 8192 ;;
    mixtral)
      harness mixtral_exact --preset mixtral --tokens 8192
      harness mixtral_fixed_c2 --preset mixtral --tokens 8192 --fixed --chunks 2 --graph ;;
    final)  # the README's table: each shape exact and fixed, 8192 and 64 tokens per GPU
      for p in qwen3 mixtral; do
        harness ${p}_exact --preset $p --tokens 8192 --graph
        harness ${p}_fixed --preset $p --tokens 8192 --fixed --graph
        harness ${p}_exact_T64 --preset $p --tokens 64 --graph
        harness ${p}_fixed_T64 --preset $p --tokens 64 --fixed --graph
      done ;;
    recheck)  # after a change to the fixed path: Qwen3 exact and fixed, Mixtral fixed, decode
      harness qwen3_exact --preset qwen3 --tokens 8192 --graph
      harness qwen3_fixed --preset qwen3 --tokens 8192 --fixed --graph
      harness mixtral_fixed --preset mixtral --tokens 8192 --fixed --graph
      harness qwen3_fixed_T64 --preset qwen3 --tokens 64 --fixed --graph ;;
    pipeline)  # the chunks' exchanges issued ahead and waited for only where read
      for c in ${QWEN3_CHUNKS-1 2 3 4}; do
        harness qwen3_fixed_c$c --preset qwen3 --tokens 8192 --fixed --chunks $c --graph
      done
      for c in ${MIXTRAL_CHUNKS-1 2 4}; do
        harness mixtral_fixed_c$c --preset mixtral --tokens 8192 --fixed --chunks $c --graph
      done ;;
    final15)  # stop 15's code (the router's top-k kernel in every inference forward): the
      # targets' configs, decode in a CUDA graph, and a transformers block sharded over NCCL
      harness qwen3_fixed_c3 --preset qwen3 --tokens 8192 --fixed --chunks 3 --graph
      harness mixtral_exact --preset mixtral --tokens 8192
      harness qwen3_fixed_T64 --preset qwen3 --tokens 64 --fixed --graph
      timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
        examples/hf_expert_parallel.py --block deepseek_v3 2>&1 | grep "^rank" \
        | tee "$OUT/hf_example.log"
      pack ;;
    final17)  # stop 16's code: the targets' configs, and one chunk, where the persistent
      # flattened down projection runs (the pipeline's chunks keep the grid)
      harness qwen3_fixed_c3 --preset qwen3 --tokens 8192 --fixed --chunks 3 --graph
      harness qwen3_fixed_c1 --preset qwen3 --tokens 8192 --fixed --graph
      harness mixtral_exact --preset mixtral --tokens 8192 ;;
    loop17)  # the exact exchange's host counts: per-expert products against grouped GEMMs
      for r in 1 2; do
        harness mixtral_exact_loop_r$r --preset mixtral --tokens 8192
        PYTHONPATH="$PWD/.var/grouped:$PYTHONPATH" harness mixtral_exact_grouped_r$r \
          --preset mixtral --tokens 8192
      done
      NPROC=2 harness mixtral_exact_loop_W2 --preset mixtral --tokens 8192
      NPROC=2 PYTHONPATH="$PWD/.var/grouped:$PYTHONPATH" harness mixtral_exact_grouped_W2 \
        --preset mixtral --tokens 8192 ;;
    sized18)  # stop 18: programs for the expected rows' tiles, against stop 17's grid
      for run in c3_r1 c2 c3_r2; do
        c=${run:1:1}
        PYTHONPATH="$PWD/.var/sized18:$PYTHONPATH" harness qwen3_fixed_${run}_sized \
          --preset qwen3 --tokens 8192 --fixed --chunks $c --graph
        harness qwen3_fixed_${run}_pre18 --preset qwen3 --tokens 8192 --fixed --chunks $c --graph
      done
      PYTHONPATH="$PWD/.var/sized18:$PYTHONPATH" harness qwen3_fixed_c1 --preset qwen3 \
        --tokens 8192 --fixed --graph
      PYTHONPATH="$PWD/.var/sized_c1:$PYTHONPATH" harness qwen3_fixed_c1_sized --preset qwen3 \
        --tokens 8192 --fixed --graph
      PYTHONPATH="$PWD/.var/sized18:$PYTHONPATH" timeout 150 python3 -m torch.distributed.run \
        --standalone --nproc-per-node "$n" launch/probe_pipeline.py 2>&1 | grep "graph fwd" \
        | cut -c1-200 | tee "$OUT/pipeline.log"
      pack ;;
    flat18)  # stop 18: the chunks' down projection flattened, on fewer SMs beside NCCL
      PYTHONPATH="$PWD/.var/sized18:$PYTHONPATH" harness qwen3_fixed_c3_base_r1 --preset qwen3 \
        --tokens 8192 --fixed --chunks 3 --graph
      for r in 0 16 32; do
        EP_MOE_RESERVE_SMS=$r PYTHONPATH="$PWD/.var/flat:$PYTHONPATH" harness \
          qwen3_fixed_c3_flat$r --preset qwen3 --tokens 8192 --fixed --chunks 3 --graph
      done
      PYTHONPATH="$PWD/.var/sized18:$PYTHONPATH" harness qwen3_fixed_c3_base_r2 --preset qwen3 \
        --tokens 8192 --fixed --chunks 3 --graph
      EP_MOE_RESERVE_SMS=16 PYTHONPATH="$PWD/.var/flat:$PYTHONPATH" timeout 150 \
        python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
        launch/probe_pipeline.py --chunks 3 2>&1 | grep "graph fwd" | cut -c1-200 \
        | tee "$OUT/pipeline.log"
      pack ;;
    home18)  # stop 18: a rank's own rows never travel, and hide both exchanges
      for r in 1 2; do
        home harness qwen3_fixed_home_r$r --preset qwen3 --tokens 8192 --fixed --graph
        harness qwen3_fixed_c3_r$r --preset qwen3 --tokens 8192 --fixed --chunks 3 --graph
      done
      harness qwen3_fixed_c1 --preset qwen3 --tokens 8192 --fixed --graph
      home timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
        launch/probe_pipeline.py --chunks 1 2>&1 | grep "graph fwd" | cut -c1-200 \
        | tee "$OUT/pipeline.log"
      pack ;;
    home18c)  # stop 18: the home split in the 3-chunk pipeline
      for r in 1 2; do
        home harness qwen3_fixed_c3_home_r$r --preset qwen3 --tokens 8192 --fixed --chunks 3 \
          --graph
        harness qwen3_fixed_c3_r$r --preset qwen3 --tokens 8192 --fixed --chunks 3 --graph
        home harness qwen3_fixed_c1_home_r$r --preset qwen3 --tokens 8192 --fixed --graph
      done
      home timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
        launch/probe_pipeline.py --chunks 1 3 2>&1 | grep "graph fwd" | cut -c1-200 \
        | tee "$OUT/pipeline.log"
      pack ;;
    streams19)  # stop 19: the pipeline's bookkeeping and reductions off the GEMMs' stream
      for r in 1 2; do
        for v in 2 0 1; do
          EP_MOE_PIPE_STREAMS=$v PYTHONPATH="$PWD/.var/streams:$PYTHONPATH" harness \
            qwen3_fixed_c3_s${v}_r$r --preset qwen3 --tokens 8192 \
            --fixed --chunks 3 --graph
        done
      done
      EP_MOE_PIPE_STREAMS=2 PYTHONPATH="$PWD/.var/streams:$PYTHONPATH" timeout 150 \
        python3 -m torch.distributed.run --standalone \
        --nproc-per-node "$n" launch/probe_pipeline.py --chunks 3 2>&1 | grep "graph fwd" \
        | cut -c1-200 | tee "$OUT/pipeline.log"
      pack ;;
    pairs19)  # stop 19: the pair dispatcher against the token one, Mixtral's shape
      for r in 1 2; do
        PYTHONPATH="$PWD/.var/pairs:$PYTHONPATH" harness mixtral_pairs_r$r --preset mixtral \
          --tokens 8192 --dispatcher all_to_all_pairs
        harness mixtral_exact_r$r --preset mixtral --tokens 8192
      done
      NPROC=2 PYTHONPATH="$PWD/.var/pairs:$PYTHONPATH" harness mixtral_pairs_W2 \
        --preset mixtral --tokens 8192 --dispatcher all_to_all_pairs
      NPROC=2 harness mixtral_exact_W2 --preset mixtral --tokens 8192 ;;
    nvlink20)  # stop 20: the fixed exchange over NVLink (--exchange nvlink: the send kernel and
      # the slot reduction store into the peers' symmetric memory) against NCCL's, Qwen3 in
      # 1 and 3 chunks, then Mixtral in one; nothing timed unless the check passes
      HARNESS_TIMEOUT=120 harness nvlink_check --preset qwen3 --tokens 8192 --fixed \
        --chunks 3 --exchange nvlink --check-only
      grep -q "check all_to_all: OK" "$OUT/nvlink_check.log" || break
      harness qwen3_nvlink_c1 --preset qwen3 --tokens 8192 --fixed --exchange nvlink --graph
      harness qwen3_fixed_c3 --preset qwen3 --tokens 8192 --fixed --chunks 3 --graph
      harness qwen3_nvlink_c3 --preset qwen3 --tokens 8192 --fixed --chunks 3 \
        --exchange nvlink --graph
      harness qwen3_fixed_c1 --preset qwen3 --tokens 8192 --fixed --graph
      harness mixtral_nvlink_c1 --preset mixtral --tokens 8192 --fixed --exchange nvlink \
        --graph ;;
    nvlink20b)  # stop 20: timelines and graph times of the NVLink exchange in 1, 2 and 3
      # chunks, the pipeline's send kernel on 32, 264 and every program it can have
      # (probe_pipeline.py), then NCCL's in 1 and 3 chunks on the same machine
      timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
        launch/probe_pipeline.py --exchange nvlink --chunks 1 2 3 \
        --send-programs 32 264 100000 2>&1 | grep "graph fwd\|Error" | cut -c1-300 \
        | tee "$OUT/pipeline_nvlink.log"
      for f in "$OUT"/pipeline_qwen3_r*.json; do mv "$f" "${f/qwen3/qwen3_nvlink}"; done
      timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
        launch/probe_pipeline.py --chunks 1 3 2>&1 | grep "graph fwd\|Error" | cut -c1-300 \
        | tee "$OUT/pipeline_collective.log"
      pack ;;
    nvlink20c)  # stop 20: the NVLink exchange with one launch for every peer (rows and
      # partials), padding partials not sent: its check, timelines in 1 and 3 chunks, then
      # the harness in one chunk against NCCL's 3 chunks, in turn
      HARNESS_TIMEOUT=120 harness nvlink_check --preset qwen3 --tokens 8192 --fixed \
        --chunks 3 --exchange nvlink --check-only
      grep -q "check all_to_all: OK" "$OUT/nvlink_check.log" || break
      timeout 200 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" \
        launch/probe_pipeline.py --exchange nvlink --chunks 1 3 2>&1 \
        | grep "graph fwd\|Error" | cut -c1-300 | tee "$OUT/pipeline_nvlink.log"
      for r in 1 2; do
        harness qwen3_nvlink_c1_r$r --preset qwen3 --tokens 8192 --fixed --exchange nvlink \
          --graph
        harness qwen3_fixed_c3_r$r --preset qwen3 --tokens 8192 --fixed --chunks 3 --graph
      done ;;
    mixtral20)  # Mixtral exact (the per-expert GEMMs, the default), twice at W = n
      harness mixtral_exact_r1 --preset mixtral --tokens 8192
      harness mixtral_exact_r2 --preset mixtral --tokens 8192 ;;
    loop18)  # loop17's W = n comparison in three runs
      harness mixtral_exact_loop_r1 --preset mixtral --tokens 8192
      PYTHONPATH="$PWD/.var/grouped:$PYTHONPATH" harness mixtral_exact_grouped_r1 \
        --preset mixtral --tokens 8192
      harness mixtral_exact_loop_r2 --preset mixtral --tokens 8192 ;;
    final11)  # stop 11's code: Qwen3 fixed in 1 and 3 chunks, decode, Mixtral exact
      harness qwen3_fixed_c1 --preset qwen3 --tokens 8192 --fixed --graph
      harness qwen3_fixed_c3 --preset qwen3 --tokens 8192 --fixed --chunks 3 --graph
      harness qwen3_fixed_T64 --preset qwen3 --tokens 64 --fixed --graph
      harness mixtral_exact --preset mixtral --tokens 8192 ;;
    channels)  # Qwen3 in 3 chunks with NCCL held to fewer channels (SMs) beside the GEMMs
      harness qwen3_fixed_c1 --preset qwen3 --tokens 8192 --fixed --graph
      harness qwen3_fixed_c3 --preset qwen3 --tokens 8192 --fixed --chunks 3 --graph
      TORCH_NCCL_HIGH_PRIORITY=1 harness qwen3_fixed_c3_hp --preset qwen3 --tokens 8192 \
        --fixed --chunks 3 --graph
      NCCL_MAX_P2P_NCHANNELS=16 harness qwen3_fixed_c3_p2p16 --preset qwen3 --tokens 8192 \
        --fixed --chunks 3 --graph
      NCCL_MAX_P2P_NCHANNELS=8 harness qwen3_fixed_c3_p2p8 --preset qwen3 --tokens 8192 \
        --fixed --chunks 3 --graph
      harness qwen3_fixed_c3_again --preset qwen3 --tokens 8192 --fixed --chunks 3 --graph ;;
    decode)
      for p in qwen3 mixtral; do
        harness ${p}_exact_T64 --preset $p --tokens 64 --graph
        harness ${p}_fixed_T64 --preset $p --tokens 64 --fixed --graph
      done ;;
  esac
done
ls -la "$FINAL"
