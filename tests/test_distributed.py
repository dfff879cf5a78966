"""Expert parallelism on CPU: gloo groups of W = 2, 3, 4, 8 spawned processes, and a two-node
`torchrun` launch.

Each world size spawns one group that runs every case of its list (process start-up is the
cost, not the cases); `dist_utils.run_cases` does the work on each rank and each test below
reports one case. A case compares every rank's output and gradients with the single-process
`MoE` on the same full weights and the concatenation of all ranks' tokens, checks
`expert_map` and the per-rank state dict against an independent derivation of the placement,
gathers `full_state_dict()` back, and repeats the step to check it is bitwise reproducible.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_utils import Case, failures_by_rank, free_port, run_cases, spawn_group

pytestmark = pytest.mark.distributed

A2A, AG = "all_to_all", "allgather"
RR = "round_robin"


def _grid(W: int, tokens: tuple, experts: tuple) -> list[Case]:
    """Both placements x both dispatchers x (E divisible by W, E not), K cycling 1, 2, 8."""
    cases, ks = [], [1, 2, 8]
    for placement in ("linear", RR):
        for dispatcher in (A2A, AG):
            for E in experts:
                K = min(ks[len(cases) % 3], E)
                # K = 1 renormalised is a weight of exactly 1: no router gradient to compare
                cases.append(Case(f"E{E}_K{K}_{placement}_{dispatcher}", tokens=tokens,
                                  config=dict(num_experts=E, top_k=K, placement=placement,
                                              dispatcher=dispatcher, norm_topk_prob=K > 1)))
                # rotate the token counts so each rank in turn has the most (or zero) tokens
                tokens = tokens[1:] + tokens[:1]
    return cases


SHARED_SIGMOID_GROUPS = dict(num_experts=8, top_k=3, score_func="sigmoid", num_expert_groups=4,
                             topk_groups=2, use_correction_bias=True, routed_scaling_factor=2.5,
                             num_shared_experts=1, shared_expert_gate=True)  # DeepSeek-V3-like
AUX = dict(aux_loss_coef=0.01, z_loss_coef=1e-3)
# FP8 experts: D and I one scale block each (the smallest FP8 shapes), bf16 activations
FP8 = dict(hidden_size=128, intermediate_size=128, expert_quant="fp8")

CASES = {
    2: _grid(2, (5, 7), (8, 7)) + [
        Case("rank1_empty_a2a", tokens=(6, 0), config=dict(top_k=2)),
        Case("rank0_empty_allgather", tokens=(0, 6), config=dict(top_k=2, dispatcher=AG)),
        Case("all_ranks_empty_a2a", tokens=(0, 0)),  # every collective moves zero rows
        Case("all_ranks_empty_allgather", tokens=(0, 0), config=dict(dispatcher=AG)),
        Case("one_token_K8_E8", tokens=(1, 1), config=dict(top_k=8)),  # K = E: T = 1
        # every token to expert 7 (rank 1's): rank 0 receives nothing, rank 1 everything
        Case("hot_expert_K1_a2a", tokens=(5, 6), config=dict(top_k=1), hot_expert=7),
        Case("hot_expert_K1_allgather", tokens=(5, 6), config=dict(top_k=1, dispatcher=AG),
             hot_expert=0),
        Case("load_full_state_dict_E5_K3_rr", tokens=(4, 3),
             config=dict(num_experts=5, top_k=3, placement=RR), load=True),
        Case("shared_sigmoid_groups_a2a", tokens=(5, 4), config=SHARED_SIGMOID_GROUPS),
        Case("bf16_a2a", tokens=(6, 5), config=dict(top_k=2), dtype=torch.bfloat16),
        # decode path: every local expert on every received row (a2a: 1..5 rows per rank;
        # allgather: rank 0's padding rows hold no slot)
        Case("dense_decode_a2a", tokens=(2, 3), config=dict(top_k=2, dense_max_rows=64)),
        Case("dense_decode_allgather_rr", tokens=(0, 2), config=dict(
            num_experts=7, top_k=3, dispatcher=AG, placement=RR, dense_max_rows=64)),
        Case("aux_loss_a2a", kind="aux_loss", tokens=(5, 3), config=dict(top_k=2, **AUX)),
        Case("uneven_7_1_a2a", tokens=(7, 1), config=dict(top_k=2)),
        # every token to rank 0's expert: rank 1 sends all, computes nothing
        Case("hot_expert_rank0_K1_a2a", tokens=(4, 3), hot_expert=0,
             config=dict(top_k=1, norm_topk_prob=False)),  # a router gradient to compare
        Case("W_gt_E", kind="too_few_experts", config=dict(num_experts=1, top_k=1)),
        Case("config_mismatch", kind="config_mismatch"),
        # fixed-size exchange (max_tokens_per_rank): padding rows travel, no split sizes;
        # one rank exactly at capacity, one below
        Case("fixed_a2a", tokens=(5, 7), config=dict(top_k=2, max_tokens_per_rank=7)),
        Case("fixed_allgather_K8_rank0_empty", tokens=(0, 6),
             config=dict(top_k=8, dispatcher=AG, max_tokens_per_rank=9)),
        Case("fixed_a2a_hot_expert_K1", tokens=(5, 6), hot_expert=7,
             config=dict(top_k=1, max_tokens_per_rank=6)),
        Case("fixed_a2a_dense_decode", tokens=(2, 3),
             config=dict(top_k=2, dense_max_rows=64, max_tokens_per_rank=4)),
        Case("fixed_a2a_bf16_shared", tokens=(6, 5), dtype=torch.bfloat16,
             config=dict(SHARED_SIGMOID_GROUPS, max_tokens_per_rank=8)),
        Case("fixed_over_capacity", kind="over_capacity", config=dict(max_tokens_per_rank=3)),
        # chunks of 2, 4 and 1 tokens: rank 0's 5 make chunks of 2, 3 and 0, rank 1's 7 of 2, 4, 1
        Case("fixed_chunks3_a2a", tokens=(5, 7),
             config=dict(top_k=2, max_tokens_per_rank=7, dispatch_chunks=3)),
        Case("fixed_chunks2_over_capacity", kind="over_capacity",
             config=dict(max_tokens_per_rank=4, dispatch_chunks=2)),
        # torch's grouped GEMM over buffers sized by the bound: rows past the count unread
        Case("fixed_grouped_mm_a2a", tokens=(5, 7),
             config=dict(top_k=2, max_tokens_per_rank=8, expert_impl="grouped_mm")),
        Case("fixed_per_expert_a2a", tokens=(5, 7),  # per-expert GEMMs over a bound-sized buffer
             config=dict(top_k=2, max_tokens_per_rank=8, expert_impl="per_expert")),
        # per-expert GEMMs on the exact exchanges: the counts come with the split sizes
        Case("per_expert_a2a", tokens=(5, 7), config=dict(top_k=2, expert_impl="per_expert")),
        Case("per_expert_allgather_rank0_empty", tokens=(0, 6),
             config=dict(top_k=3, dispatcher=AG, expert_impl="per_expert")),
        Case("fixed_one_rank_over_capacity", kind="one_over_capacity",
             config=dict(max_tokens_per_rank=3)),
        # FP8 experts: e4m3 rows and scales out, bf16 partials back
        Case("fp8_a2a", kind="fp8", tokens=(5, 7), dtype=torch.bfloat16,
             config=dict(FP8, top_k=2)),
        Case("fp8_fixed_chunks2_a2a_rank1_empty", kind="fp8", tokens=(6, 0),
             dtype=torch.bfloat16, config=dict(FP8, top_k=3, max_tokens_per_rank=6,
                                               dispatch_chunks=2)),
        Case("fp8_allgather", kind="fp8", tokens=(3, 4), dtype=torch.bfloat16,
             config=dict(FP8, top_k=2, dispatcher=AG)),  # bf16 rows, quantized by the GEMM
        # cuBLAS per expert (emulated off Hopper) on the e4m3 rows the exact exchange brought
        Case("fp8_per_expert_a2a", kind="fp8", tokens=(7, 5), dtype=torch.bfloat16,
             config=dict(FP8, top_k=2, expert_impl="per_expert")),
    ],
    3: _grid(3, (5, 0, 9), (6, 7)) + [
        Case("E5_K2_linear_a2a_uneven", tokens=(4, 7, 2), config=dict(num_experts=5)),
        Case("hot_expert_K2_rr_a2a", tokens=(3, 5, 4),
             config=dict(top_k=2, placement=RR), hot_expert=4),
        Case("hot_expert_K8_allgather", tokens=(3, 0, 4), config=dict(top_k=8, dispatcher=AG),
             hot_expert=2),
        Case("shared_sigmoid_groups_allgather_rr", tokens=(2, 6, 3),
             config=dict(SHARED_SIGMOID_GROUPS, dispatcher=AG, placement=RR)),
        Case("aux_loss_allgather", kind="aux_loss", tokens=(4, 0, 5),
             config=dict(top_k=2, dispatcher=AG, **AUX)),
        Case("bf16_allgather_rr", tokens=(5, 3, 6), dtype=torch.bfloat16,
             config=dict(num_experts=7, top_k=2, dispatcher=AG, placement=RR)),
        Case("K8_rr_a2a_rank1_empty", tokens=(9, 0, 5), config=dict(top_k=8, placement=RR)),
        Case("W_gt_E", kind="too_few_experts", config=dict(num_experts=2, top_k=1)),
        Case("config_mismatch", kind="config_mismatch"),
        # 2, 2 and 1 experts: rank 2's count message has a padding column
        Case("E5_K3_per_expert_a2a", tokens=(4, 7, 2),
             config=dict(num_experts=5, top_k=3, expert_impl="per_expert")),
        Case("E5_K2_rr_per_expert_allgather", tokens=(3, 0, 6),
             config=dict(num_experts=5, top_k=2, placement=RR, dispatcher=AG,
                         expert_impl="per_expert")),
        Case("fixed_K8_rr_a2a_rank1_empty", tokens=(9, 0, 5),
             config=dict(top_k=8, placement=RR, max_tokens_per_rank=9)),
        Case("fixed_E7_K3_allgather", tokens=(4, 2, 0),
             config=dict(num_experts=7, top_k=3, dispatcher=AG, max_tokens_per_rank=5)),
        Case("fixed_chunks2_rr_a2a_rank1_empty", tokens=(6, 0, 3),
             config=dict(top_k=3, placement=RR, max_tokens_per_rank=6, dispatch_chunks=2)),
    ],
    4: _grid(4, (3, 6, 0, 5), (8, 5)) + [
        Case("hot_expert_K1_rr_a2a", tokens=(2, 3, 4, 5), config=dict(top_k=1, placement=RR),
             hot_expert=5),  # three ranks receive nothing
        Case("shared_sigmoid_groups_a2a", tokens=(3, 1, 0, 4), config=SHARED_SIGMOID_GROUPS),
        Case("dense_decode_K8_allgather", tokens=(1, 0, 2, 1),
             config=dict(top_k=8, dispatcher=AG, dense_max_rows=8)),
        # two expert-parallel groups of 2 in a world of 4: group ranks, not world ranks
        Case("two_ep_groups_of_2_a2a", tokens=(4, 3), config=dict(top_k=2), ep_size=2),
        Case("two_ep_groups_of_2_allgather_rr", tokens=(0, 5), ep_size=2,
             config=dict(num_experts=7, top_k=3, dispatcher=AG, placement=RR)),
        Case("bf16_shared_a2a", tokens=(6, 0, 4, 5), dtype=torch.bfloat16,
             config=SHARED_SIGMOID_GROUPS),
        Case("W_gt_E", kind="too_few_experts", config=dict(num_experts=3, top_k=1)),
        Case("config_mismatch", kind="config_mismatch"),
        Case("fixed_E5_K2_a2a", tokens=(3, 6, 0, 5),
             config=dict(num_experts=5, top_k=2, max_tokens_per_rank=6)),
        Case("fixed_E8_K8_rr_allgather", tokens=(2, 0, 3, 1),
             config=dict(top_k=8, placement=RR, dispatcher=AG, max_tokens_per_rank=3)),
        Case("fixed_chunks4_K8_a2a", tokens=(5, 2, 0, 7),
             config=dict(top_k=8, max_tokens_per_rank=7, dispatch_chunks=4)),
        Case("fixed_grouped_mm_chunks2_K8_a2a", tokens=(3, 6, 0, 5),
             config=dict(top_k=8, max_tokens_per_rank=6, dispatch_chunks=2,
                         expert_impl="grouped_mm")),
        Case("fp8_shared_sigmoid_groups_rr_a2a", kind="fp8", tokens=(4, 0, 3, 5),
             dtype=torch.bfloat16, config=dict(SHARED_SIGMOID_GROUPS, placement=RR, **FP8)),
        Case("fp8_fixed_K8_a2a", kind="fp8", tokens=(2, 5, 0, 4), dtype=torch.bfloat16,
             config=dict(FP8, top_k=8, max_tokens_per_rank=5)),
    ],
    # the 8-GPU code path at tiny sizes: one expert per rank, and top-8 of 16 experts
    8: [
        Case("E8_K2_linear_a2a", tokens=(3, 0, 5, 2, 4, 1, 6, 2), config=dict(top_k=2)),
        Case("E8_K1_rr_allgather", tokens=(2, 4, 0, 3, 1, 5, 2, 2),
             config=dict(top_k=1, placement=RR, dispatcher=AG, norm_topk_prob=False)),
        Case("E16_K8_linear_a2a", tokens=(4, 2, 3, 0, 5, 1, 2, 3),
             config=dict(num_experts=16, top_k=8)),
        Case("E16_K8_rr_allgather", tokens=(1, 3, 2, 4, 0, 2, 5, 1),
             config=dict(num_experts=16, top_k=8, placement=RR, dispatcher=AG)),
        Case("E16_K8_hot_expert_a2a", tokens=(2, 2, 1, 3, 2, 0, 4, 1),
             config=dict(num_experts=16, top_k=8, placement=RR), hot_expert=9),
    ],
}

# a guard against hangs, not a speed test: the W = 3 group took 132-155 s under the CPU
# interpreter on a 2-core machine
_TIMEOUT_S = {2: 300, 3: 300, 4: 360, 8: 480}
_RESULTS: dict = {}


def _group_results(W: int) -> list:
    """Per-rank results of the W group, spawned on first use and shared by its tests."""
    if W not in _RESULTS:
        try:
            _RESULTS[W] = spawn_group(run_cases, W, (CASES[W],), timeout=_TIMEOUT_S[W])
        except RuntimeError as e:
            _RESULTS[W] = e
    if isinstance(_RESULTS[W], RuntimeError):
        pytest.fail(f"the W={W} process group failed:\n{_RESULTS[W]}", pytrace=False)
    return _RESULTS[W]


def test_case_names_are_unique():
    for W, cases in CASES.items():
        names = [c.name for c in cases]
        assert len(names) == len(set(names)), f"W={W}: duplicate case names"
        for c in cases:
            assert c.kind != "match" or len(c.tokens) == (c.ep_size or W), c.name


@pytest.mark.parametrize("W, name", [(W, c.name) for W, cases in CASES.items() for c in cases],
                         ids=[f"W{W}-{c.name}" for W, cases in CASES.items() for c in cases])
def test_expert_parallel(W, name):
    failures = failures_by_rank(_group_results(W), name)
    assert not failures, f"W={W} case {name}:\n{failures}"


# --------------------------------------------------------------------------------------------
# Two nodes, one process each, launched by torchrun as a cluster would
# --------------------------------------------------------------------------------------------

_WORKER = Path(__file__).with_name("two_node_worker.py")


def test_two_node_torchrun(tmp_path):
    port = free_port()
    env = dict(os.environ)  # TRITON_INTERPRET and the rest pass through; the worker finds
    # dist_utils beside it (a script's directory leads its sys.path)
    procs, logs = [], []
    for node_rank in range(2):
        log = open(tmp_path / f"node{node_rank}.log", "w+")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--node-rank", str(node_rank),
               "--master-addr", "127.0.0.1", "--master-port", str(port), str(_WORKER)]
        # own session: on timeout the agent and its worker are killed together
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        logs.append(log)
    deadline = time.monotonic() + 180
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    report = []
    for node_rank, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        report.append(f"--- node {node_rank}: exit {p.returncode} ---\n{log.read()[-4000:]}")
        log.close()
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], "two-node torchrun failed (negative: killed on timeout):\n" + \
        "\n".join(report)
