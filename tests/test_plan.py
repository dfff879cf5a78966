"""The forward planner (`ep_moe.plan`): which router top-k, exchange, chunks and experts' path
each kind of forward gets, the settings it derives, the errors of forced choices it cannot
honour, and the README's table of which path runs when, row by row against `plan_forward`.

The planner is a pure function: every case here names its inputs, no GPU needed. That the
layer runs what its plan says is checked where the paths are (test_layer.py, test_compile.py,
the gloo tests' host-read and overlap checks in dist_utils.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ep_moe import MoE, MoEConfig
from ep_moe.plan import (AUTO_CHUNKS, DENSE_MAX_ROWS, EXPERT_PATHS, ForwardPlan,
                         TRITON_MAX_ROWS_PER_EXPERT, TRITON_MAX_ROWS_PER_EXPERT_SMALL_I,
                         plan_forward)

README = Path(__file__).resolve().parents[1] / "README.md"
PRESETS = {"Mixtral": MoEConfig.mixtral_8x7b(), "Qwen3": MoEConfig.qwen3_30b_a3b(),
           "DeepSeek-V3": MoEConfig.deepseek_v3(), "tiny": MoEConfig.tiny()}
PRESETS.update({f"{name} FP8": PRESETS[name].replace(expert_quant="fp8")
                for name in ("Mixtral", "Qwen3", "DeepSeek-V3")})


def plan(config: MoEConfig, T: int, W: int = 1, *, grad: bool = False, device: str = "cuda",
         dtype=torch.bfloat16, triton: bool = None, peers: bool = True,
         capturing: bool = False, compiling: bool = False) -> ForwardPlan:
    """The plan on one rank of W with the experts spread evenly (as `linear` placement); CUDA
    means Hopper (cuBLAS's block-scaled FP8 GEMM runs)."""
    e = -(-config.num_experts // W)
    return plan_forward(config, world_size=W, num_local_experts=e, num_tokens=T,
                        device_type=device, dtype=dtype,
                        triton=(device == "cuda") if triton is None else triton, grad=grad,
                        peer_exchange=peers and device == "cuda", capturing=capturing,
                        compiling=compiling, blockwise_fp8=device == "cuda")


# --------------------------------------------------------------------------------------------
# One GPU
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, T, experts", [
    ("Mixtral", 16, "triton"),     # decode: weight-bound, the Triton GEMMs at 8 rows an expert
    ("Mixtral", 512, "triton"),    # 128 rows an expert <= 256
    ("Mixtral", 4096, "grouped_mm"),  # 1024 rows an expert: torch's (CUTLASS) grouped GEMM
    ("Qwen3", 16, "triton"),
    ("Qwen3", 4096, "triton"),     # 256 rows an expert, small I: up to 1024
    ("Qwen3", 32768, "grouped_mm"),  # 2048 rows an expert
    ("DeepSeek-V3", 4096, "triton"),  # 128 rows an expert (I = 2048: the 256 limit)
])
def test_one_gpu_inference(preset, T, experts):
    p = plan(PRESETS[preset], T)
    assert (p.dispatcher, p.exchange, p.chunks, p.experts) == ("local", "none", 1, experts)
    assert p.rows == T and p.pairs == T * PRESETS[preset].top_k and not p.grad


@pytest.mark.parametrize("preset, T, experts", [
    ("Mixtral", 1, "grouped_mm"),  # never dense: its backward would write every expert's grad
    ("Mixtral", DENSE_MAX_ROWS, "grouped_mm"),
    ("Qwen3", 4096, "grouped_mm"),  # training: torch's grouped GEMM has the backward
    ("tiny", 0, "grouped_mm"),     # no rows: the empty product that still gives gradients
])
def test_one_gpu_training(preset, T, experts):
    p = plan(PRESETS[preset], T, grad=True)
    assert p.experts == experts and p.grad


def test_triton_row_limits_by_intermediate_size():
    # the switch to torch's grouped GEMM sits at the mean rows per expert the sweeps measured
    for I, limit in ((768, TRITON_MAX_ROWS_PER_EXPERT_SMALL_I),
                     (1024, TRITON_MAX_ROWS_PER_EXPERT_SMALL_I),
                     (1032, TRITON_MAX_ROWS_PER_EXPERT)):
        cfg = MoEConfig(hidden_size=512, intermediate_size=I, num_experts=8, top_k=2)
        T = limit * 8 // 2  # pairs = T * K = limit rows on each of 8 experts
        assert plan(cfg, T).experts == "triton"
        assert plan(cfg, T + 1).experts == "grouped_mm"


def test_router_topk():
    assert plan(PRESETS["Mixtral"], 16).router_topk == "triton"
    assert plan(PRESETS["DeepSeek-V3"], 16).router_topk == "torch"  # groups, bias, sigmoid
    assert plan(PRESETS["Mixtral"], 16, device="cpu").router_topk == "torch"
    assert plan(PRESETS["Mixtral"], 16, device="cpu", triton=True).router_topk == "triton"


def test_cpu_without_triton():
    # the torch paths only: torch's grouped GEMM (fp32 on CPU too), the dense path for a few
    assert plan(PRESETS["tiny"], 100, device="cpu", dtype=torch.float32).experts == "grouped_mm"
    assert plan(PRESETS["tiny"], 10, device="cpu", dtype=torch.float32).experts == "dense"
    odd = MoEConfig.tiny(hidden_size=10)  # rows of 20 bytes: torch's grouped GEMM refuses
    assert plan(odd, 100, device="cpu", dtype=torch.float32).experts == "per_expert"


def test_dense_max_rows():
    """Inference where the Triton path does not run: dense up to the limit; never in
    training."""
    assert MoEConfig.tiny().dense_max_rows is None  # derived: DENSE_MAX_ROWS
    cpu = dict(device="cpu", dtype=torch.float32)
    assert plan(MoEConfig.tiny(), DENSE_MAX_ROWS, **cpu).experts == "dense"
    assert plan(MoEConfig.tiny(dense_max_rows=0), 4, **cpu).experts == "grouped_mm"
    assert plan(MoEConfig.tiny(dense_max_rows=8), 8, **cpu).experts == "dense"
    assert plan(MoEConfig.tiny(dense_max_rows=8), 9, **cpu).experts == "grouped_mm"
    assert plan(MoEConfig.tiny(dense_max_rows=8), 8, grad=True, **cpu).experts == "grouped_mm"


# --------------------------------------------------------------------------------------------
# Expert parallelism
# --------------------------------------------------------------------------------------------

def test_exact_exchange_large_experts_take_per_expert_gemms():
    # the exact exchange brings each expert's rows to the host: one cuBLAS GEMM per expert
    # for Mixtral's large experts (8192 tokens per GPU at W = 4: 8192 rows on each of 2)
    mixtral = PRESETS["Mixtral"]
    for grad in (False, True):
        p = plan(mixtral, 8192, W=4, grad=grad)
        assert (p.dispatcher, p.exchange, p.chunks, p.experts) == \
            ("all_to_all", "exact", 1, "per_expert")
    assert plan(mixtral, 512, W=4, grad=True).experts == "grouped_mm"  # 512 rows an expert
    # Qwen3's small experts never loop; and under torch.compile nothing does
    assert plan(PRESETS["Qwen3"], 65536, W=4, grad=True).experts == "grouped_mm"
    assert plan(mixtral, 8192, W=4, grad=True, compiling=True).experts == "grouped_mm"


@pytest.mark.parametrize("peers, grad, exchange", [
    (True, False, "nvlink"),     # inference on CUDA peers of one host: stores over NVLink
    (False, False, "fixed"),     # peers that cannot map each other's memory: NCCL
    (True, True, "fixed"),       # training: the collectives (the NVLink path has no backward)
])
def test_fixed_exchange_auto(peers, grad, exchange):
    qwen3 = PRESETS["Qwen3"].replace(max_tokens_per_rank=8192)
    p = plan(qwen3, 8192, W=4, grad=grad, peers=peers)
    assert p.exchange == exchange and p.rows == 4 * 8192 and p.pairs == 8192 * 8
    # behind a fixed-size exchange small experts take the Triton path whatever the rows
    assert p.experts == ("grouped_mm" if grad else "triton")


def test_fixed_exchange_settings_forced():
    qwen3 = PRESETS["Qwen3"].replace(max_tokens_per_rank=64)
    assert plan(qwen3.replace(exchange="collective"), 64, W=4).exchange == "fixed"
    assert plan(qwen3.replace(exchange="nvlink"), 64, W=4, peers=False).exchange == "nvlink"
    assert plan(qwen3.replace(exchange="nvlink"), 64, W=4, grad=True).exchange == "fixed"
    with pytest.raises(ValueError, match="exchange='nvlink' needs CUDA tensors"):
        plan(qwen3.replace(exchange="nvlink"), 64, W=4, device="cpu")
    # gloo on CPU: the collectives
    assert plan(qwen3, 64, W=4, device="cpu", dtype=torch.float32).exchange == "fixed"


@pytest.mark.parametrize("C, capturing, peers, grad, chunks", [
    (8192, True, False, False, AUTO_CHUNKS),  # prefill-sized, NCCL, in a graph: pipelined
    (8192, False, False, False, 1),  # eager: each chunk's host calls cost more than they hide
    (8192, True, True, False, 1),    # over NVLink one chunk is fastest
    (128, True, False, False, 1),    # decode-sized: the exchange is latency, not bytes
    (8192, True, False, True, 1),    # training
])
def test_auto_chunks(C, capturing, peers, grad, chunks):
    cfg = PRESETS["Qwen3"].replace(max_tokens_per_rank=C)
    assert plan(cfg, C, W=4, capturing=capturing, peers=peers, grad=grad).chunks == chunks
    # a number in the config is taken as it is
    assert plan(cfg.replace(dispatch_chunks=2), C, W=4, capturing=capturing, peers=peers,
                grad=grad).chunks == 2


def test_allgather_dispatcher():
    cfg = PRESETS["tiny"].replace(dispatcher="allgather")
    p = plan(cfg, 100, W=2, grad=True)
    assert (p.dispatcher, p.exchange, p.rows) == ("allgather", "exact", 200)
    p = plan(cfg.replace(max_tokens_per_rank=64), 10, W=2, peers=True)
    assert (p.dispatcher, p.exchange, p.rows) == ("allgather", "fixed", 128)  # never nvlink


# --------------------------------------------------------------------------------------------
# Forced paths, and the plan as the layer shows it
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", EXPERT_PATHS)
def test_forced_paths(impl):
    cfg = PRESETS["Qwen3"].replace(expert_impl=impl)
    assert plan(cfg, 4096).experts == impl
    if impl == "triton":
        with pytest.raises(ValueError, match="expert_impl='triton' runs inference"):
            plan(cfg, 4096, grad=True)
        with pytest.raises(ValueError, match="expert_impl='triton'"):
            plan(cfg, 4096, device="cpu")
    else:
        assert plan(cfg, 4096, grad=True).experts == impl


def test_forced_grouped_mm_where_torch_cannot():
    cfg = PRESETS["tiny"].replace(expert_impl="grouped_mm")
    with pytest.raises(ValueError, match="bf16 only under torch.compile"):
        plan(cfg, 100, dtype=torch.float32, compiling=True)
    with pytest.raises(ValueError, match="D and I multiples of 16 bytes"):
        plan(cfg.replace(hidden_size=10), 100, dtype=torch.float32)


def test_plan_is_frozen_and_readable():
    p = plan(PRESETS["Mixtral"], 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.experts = "dense"
    text = repr(p)
    for field in ("router_topk='triton'", "dispatcher='local'", "exchange='none'",
                  "experts='triton'", "rows=16", "pairs=32", "grad=False"):
        assert field in text, text


def test_layer_plan_follows_grad_and_token_count():
    layer = MoE(MoEConfig.tiny(dense_max_rows=4))
    x = torch.randn(2, 3, 16)  # (..., D): T = 6
    assert layer.plan(x).rows == 6 and layer.plan(x).grad  # the parameters want gradients
    with torch.no_grad():
        assert not layer.plan(x).grad
    layer.requires_grad_(False)
    assert not layer.plan(x).grad
    assert layer.plan(x.requires_grad_()).grad
    assert layer.plan(x[:1, :2]).experts == "grouped_mm"  # training: never the dense path


# --------------------------------------------------------------------------------------------
# The README's table of which path runs when
# --------------------------------------------------------------------------------------------

def readme_path_table() -> list[dict]:
    """Rows of the first table after the README's `<!-- path table -->` marker, as dicts."""
    text = README.read_text()
    table = []
    for line in text[text.index("<!-- path table"):].splitlines()[1:]:
        if line.startswith("|"):
            table.append(line)
        elif table or line.strip():
            break
    cells = [[c.strip().strip("`") for c in line.strip().strip("|").split("|")]
             for line in table if not set(line) <= set("|-: ")]
    return [dict(zip(cells[0], row)) for row in cells[1:]]


def test_readme_path_table_matches_the_planner():
    rows = readme_path_table()
    assert len(rows) >= 8
    for row in rows:
        cfg = PRESETS[row["model"]]
        C = None if row["max_tokens_per_rank"] in ("-", "") else int(row["max_tokens_per_rank"])
        cfg = cfg.replace(max_tokens_per_rank=C)
        T = int(row["tokens per GPU"])
        p = plan(cfg, T, W=int(row["GPUs"]), grad=row["training"] == "yes",
                 capturing=row["CUDA graph"] == "yes")
        got = {"experts": p.experts, "exchange": p.exchange, "chunks": str(p.chunks)}
        want = {k: row[k] for k in got}
        assert got == want, (row, p)
