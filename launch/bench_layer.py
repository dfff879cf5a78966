"""The single-GPU MoE layer, eager and compiled, against transformers' block and the floor.

    python launch/bench_layer.py                                  # Mixtral, Qwen3-30B-A3B; 16, 512, 4096 tokens
    python launch/bench_layer.py --presets deepseek_v3 --tokens 16 16384
    python launch/bench_layer.py                                  # no GPU: the tiny preset on the CPU

Each shape builds a transformers v5 block with random weights on its `grouped_mm` path
(`block.experts.config._experts_implementation = "grouped_mm"`, torch's grouped GEMM: the
fastest path transformers offers) and `MoE.from_hf(block)` with the same weights. Then:

1. Check, before any timing: ep_moe eager, ep_moe under `torch.compile(fullgraph=True)` and the
   transformers block, each against the float64 reference (`ep_moe.reference`) with the
   experts it routed to, on the first 256 tokens. A failure stops the run.
2. Time, the same way for all three: the forward (no grad) and the training step (forward and
   backward from gradients set to None). Forwards of T <= 256 tokens are launch-bound: they
   are timed by CUDA-graph replay (12 calls a graph over 4 input sets); everything else by
   `triton.testing.do_bench` medians.
3. Floor: max(FLOPs / matmul ceiling, weight bytes of the experts hit / copy ceiling), both
   ceilings measured in this run; the training step's floor is 3x the forward's.

Two tables last (forward, training step); the full JSON goes to $OUT/bench_layer.json ($OUT
defaults to ./out). On the CPU the times only show that every path runs.
Notation: T tokens, D hidden size, I expert intermediate size, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (bench_ms, copy_ceiling_gbs, graph_time_us, markdown_table,  # noqa: E402
                    matmul_ceiling_tflops, note, run_info, write_json)

from ep_moe import MoE, MoEConfig  # noqa: E402
from ep_moe.reference import reference_moe  # noqa: E402

GRAPH_MAX_T = 256  # forwards up to this many tokens are timed by CUDA-graph replay
INPUT_SETS = 4  # rotating inputs: no timed call reads what the one before left in L2
CHECK_T = 256  # tokens checked against the float64 reference (its per-expert loop is slow)
TOLERANCE = 2e-2  # relative norm, bf16 against float64: bf16 rounds to ~4e-3 per operation
VARIANTS = {"eager": "ep_moe eager", "compiled": "ep_moe compiled",
            "grouped_mm": "transformers grouped_mm"}


# --------------------------------------------------------------------------------------------
# The three modules
# --------------------------------------------------------------------------------------------

def hf_block(preset: str, cfg: MoEConfig):
    """A transformers v5 block of the preset's shape on the grouped_mm path (weights empty)."""
    if cfg.score_func == "sigmoid":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
        block = DeepseekV3MoE(DeepseekV3Config(
            hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.intermediate_size,
            n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
            n_group=cfg.num_expert_groups, topk_group=cfg.topk_groups, norm_topk_prob=True,
            n_shared_experts=cfg.num_shared_experts,
            routed_scaling_factor=cfg.routed_scaling_factor))
    elif preset.startswith("qwen3"):
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
        block = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
            hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.intermediate_size,
            num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, norm_topk_prob=True))
    else:  # mixtral, and tiny (the same routing: softmax, top-k renormalised)
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        block = MixtralSparseMoeBlock(MixtralConfig(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k))
    block.experts.config._experts_implementation = "grouped_mm"
    return block


def build(preset: str, device, compile_backend: str):
    """(ep_moe config, {variant: module}): the transformers block, ep_moe with its weights, and
    that layer compiled."""
    cfg = MoEConfig.preset(preset)
    torch.manual_seed(0)
    with torch.device(device):  # draw the weights where they live: no fp32 copy on the host
        block = hf_block(preset, cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, cfg.init_std)
    block = block.to(device=device, dtype=torch.bfloat16)
    ours = MoE.from_hf(block)
    compiled = torch.compile(ours, fullgraph=True, dynamic=False, backend=compile_backend)
    return ours.config, {"eager": ours, "compiled": compiled, "grouped_mm": block}


def routed_ids(name: str, module, x):
    """(T, K) experts the module routes x (B, T, D) to."""
    with torch.no_grad():
        if name == "grouped_mm":
            return module.gate(x.view(-1, x.shape[-1]))[2]
        return module(x, return_router_output=True)[1].topk_ids


# --------------------------------------------------------------------------------------------
# Check, floor, timers
# --------------------------------------------------------------------------------------------

def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(cfg, modules, x) -> dict:
    """Each module's relative error against float64 on its own routing; raises past TOLERANCE."""
    params = {k: v.detach() for k, v in modules["eager"].state_dict().items()}
    n = min(x.shape[1], CHECK_T)
    errors = {}
    for name, module in modules.items():
        with torch.no_grad():
            y = module(x)[0, :n]
        ids = routed_ids(name, module, x)[:n]
        y_ref, _, _ = reference_moe(x[0, :n], params, cfg, topk_ids=ids)
        errors[name] = rel(y, y_ref)
        if not errors[name] < TOLERANCE:
            raise SystemExit(f"{VARIANTS[name]}: relative error {errors[name]:.3g} against "
                             f"the float64 reference (T={x.shape[1]}), above {TOLERANCE}")
    return errors


def floor_ms(cfg: MoEConfig, T: int, hit: int, mm_tflops: float, copy_gbs: float) -> float:
    """max(FLOPs / matmul ceiling, bytes of the weights read / copy ceiling) of a bf16 forward:
    3 GEMMs of D x I per routed pair and per token through the shared MLP; the hit experts'
    weights and the shared MLP's read once."""
    D, I, K, S = cfg.hidden_size, cfg.intermediate_size, cfg.top_k, cfg.shared_size
    flops = 6 * D * (T * K * I + T * S)
    weight_bytes = 3 * D * (hit * I + S) * 2
    return max(flops / mm_tflops / 1e9, weight_bytes / copy_gbs / 1e6)


def forward_times(modules, xs, device, graph: bool) -> tuple[dict, str]:
    """{variant: forward ms} and the timer used: CUDA-graph replay when `graph` and every
    variant captures, else do_bench medians for all (one timer for the whole row)."""
    def calls(module):
        def fwd(x):
            with torch.no_grad():
                module(x)
        return [lambda x=x: fwd(x) for x in xs]

    if graph:
        try:
            return {name: graph_time_us(calls(m), calls=3 * len(xs), replays=30) / 1e3
                    for name, m in modules.items()}, "cuda_graph"
        except Exception as err:  # one variant would not capture: time them all alike
            note(f"CUDA-graph capture failed ({type(err).__name__}: {str(err)[:120]}); "
                 f"this row is timed by do_bench")
    times = {}
    for name, m in modules.items():
        turn = itertools.cycle(calls(m))
        times[name] = bench_ms(lambda: next(turn)(), device)
    return times, "do_bench" if device.type == "cuda" else "cpu_wall"


def train_times(modules, x, device) -> tuple[dict, dict]:
    """{variant: training-step ms}, {variant: peak GiB during a step} (CUDA)."""
    g = torch.randn_like(x)
    xg = x.clone().requires_grad_()
    times, peaks = {}, {}
    for name, m in modules.items():
        owner = modules["eager"] if name == "compiled" else m  # compiled shares its params

        def step():
            owner.zero_grad(set_to_none=True)
            xg.grad = None
            m(xg).backward(g)

        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
        times[name] = bench_ms(step, device)
        owner.zero_grad(set_to_none=True)
    return times, peaks


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------

def bench_shape(preset, cfg, modules, T, device, ceilings) -> dict:
    D = cfg.hidden_size
    xs = [torch.randn(1, T, D, device=device, dtype=torch.bfloat16) for _ in range(INPUT_SETS)]
    errors = check(cfg, modules, xs[0])
    with torch.no_grad():
        counts = modules["eager"](xs[0], return_router_output=True)[1].num_tokens_per_expert
    hit = int((counts > 0).sum())
    floor = floor_ms(cfg, T, hit, ceilings["matmul_ceiling_tflops"], ceilings["copy_ceiling_gbs"])
    graph = device.type == "cuda" and T <= GRAPH_MAX_T
    fwd, timer = forward_times(modules, xs, device, graph)
    train, peaks = train_times(modules, xs[0], device)
    row = {"preset": preset, "T": T, "experts_hit": hit, "timer": timer,
           "floor_ms": floor, "train_floor_ms": 3 * floor}
    for name in VARIANTS:
        row[f"{name}_err_vs_fp64"] = errors[name]
        row[f"{name}_ms"] = fwd[name]
        row[f"train_{name}_ms"] = train[name]
        if name in peaks:
            row[f"train_{name}_peak_gib"] = peaks[name]
    for prefix in ("", "train_"):
        eager = row[f"{prefix}eager_ms"]
        row[f"{prefix}compiled_over_eager"] = row[f"{prefix}compiled_ms"] / eager
        row[f"{prefix}grouped_mm_over_eager"] = row[f"{prefix}grouped_mm_ms"] / eager
        row[f"{prefix}eager_over_floor"] = eager / row[f"{prefix}floor_ms"]
    return row


def tables(rows, train_timer: str) -> str:
    headers = {"preset": "shape", "timer": "timer", "floor_ms": "floor",
               "eager_ms": "ep_moe eager", "compiled_ms": "ep_moe compiled",
               "compiled_over_eager": "compiled / eager",
               "grouped_mm_ms": "transformers grouped_mm",
               "grouped_mm_over_eager": "grouped_mm / eager"}
    fwd_cols = list(headers)
    fwd_cols.insert(1, "T")
    train_cols = ["preset", "T", "train_floor_ms", "train_eager_ms", "train_compiled_ms",
                  "train_compiled_over_eager", "train_grouped_mm_ms",
                  "train_grouped_mm_over_eager"]
    train_headers = {c: headers.get(c.removeprefix("train_"), c) for c in train_cols}
    return ("forward (no grad), ms\n\n" + markdown_table(rows, fwd_cols, headers) +
            f"\n\ntraining step (forward + backward), ms, {train_timer}\n\n" +
            markdown_table(rows, train_cols, train_headers))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=None,
                   help="mixtral | qwen3 | deepseek_v3 | tiny (default: mixtral qwen3 on a GPU, "
                        "tiny on the CPU)")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help="T per forward (default: 16 512 4096 on a GPU, 16 on the CPU)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor on a GPU; aot_eager on the "
                        "CPU, where inductor's C++ build takes minutes)")
    args = p.parse_args(argv)
    if any(t < 1 for t in args.tokens or []):
        p.error(f"--tokens must be >= 1, got {args.tokens}")
    return args


def main(argv=None):
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    presets = args.presets or (["mixtral", "qwen3"] if on_gpu else ["tiny"])
    tokens = args.tokens or ([16, 512, 4096] if on_gpu else [16])
    backend = args.compile_backend or ("inductor" if on_gpu else "aot_eager")
    if not on_gpu:
        note("no GPU: bf16 on the CPU (Triton kernels under TRITON_INTERPRET=1 if set); the "
             "times only show that each path runs")
    # one compiled graph per (preset, T, grad mode): more than dynamo's default allows
    torch._dynamo.config.cache_size_limit = 64
    report = {**run_info(device), "compile_backend": backend,
              "copy_ceiling_gbs": copy_ceiling_gbs(device),
              "matmul_ceiling_tflops": matmul_ceiling_tflops(device), "rows": []}
    print(f"# {report['device']}, torch {report['torch']}, triton {report['triton']}: copy "
          f"{report['copy_ceiling_gbs']:.4g} GB/s, bf16 matmul "
          f"{report['matmul_ceiling_tflops']:.4g} TFLOP/s", flush=True)
    for preset in presets:
        cfg, modules = build(preset, device, backend)
        for T in tokens:
            row = bench_shape(preset, cfg, modules, T, device, report)
            report["rows"].append(row)
            print(f"{preset} T={T}: checked (errors " + ", ".join(
                f"{n} {row[f'{n}_err_vs_fp64']:.1e}" for n in VARIANTS) + "), timed", flush=True)
        del modules
        torch._dynamo.reset()
        if on_gpu:
            torch.cuda.empty_cache()
    path = write_json("bench_layer.json", report)
    print()
    print(tables(report["rows"], "do_bench" if on_gpu else "cpu_wall"))
    print(f"\nwrote {path}")
    return report


if __name__ == "__main__":
    main()
