"""The single-GPU MoE layer, eager and compiled, against transformers' block and the floor.

    python launch/bench_layer.py                                  # Mixtral, Qwen3-30B-A3B; 16, 512, 4096 tokens
    python launch/bench_layer.py --presets deepseek_v3 --tokens 16 16384 --variants eager
    python launch/bench_layer.py --fp8 --tokens 1 16 128 4096 16384  # and the FP8 experts
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

With --fp8, a fourth module: the same layer with its experts quantized to e4m3 with 128 x 128
block scales (`quantize_experts("fp8")`, inference only). It is checked against the float64
reference of the same quantization (`reference_moe_fp8`; on the per-expert path the first
product stored in bf16, as that path does), its output compared with the bf16
layer's, its forward timed beside the others, and set against its own floor: e4m3 weight bytes
and scales over the copy ceiling, the routed FLOPs over the FP8 matmul ceiling
(`torch._scaled_mm`, measured in this run).

Two tables last (forward, training step), a third with --fp8; the full JSON goes to
$OUT/bench_layer.json ($OUT defaults to ./out). On the CPU the times only show that every path
runs.
Notation: T tokens, D hidden size, I expert intermediate size, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (bench_ms, copy_ceiling_gbs, fp8_matmul_ceiling_tflops,  # noqa: E402
                    fp8_shape, graph_time_us, markdown_table, matmul_ceiling_tflops, note,
                    run_info, write_json)

from ep_moe import MoE, MoEConfig  # noqa: E402
from ep_moe.fp8 import expert_weight_bytes  # noqa: E402
from ep_moe.reference import reference_moe, reference_moe_fp8  # noqa: E402

GRAPH_MAX_T = 256  # forwards up to this many tokens are timed by CUDA-graph replay
INPUT_SETS = 4  # rotating inputs: no timed call reads what the one before left in L2
CHECK_T = 256  # tokens checked against the float64 reference (its per-expert loop is slow)
TOLERANCE = 2e-2  # relative norm, bf16 against float64: bf16 rounds to ~4e-3 per operation
VARIANTS = {"eager": "ep_moe eager", "compiled": "ep_moe compiled",
            "grouped_mm": "transformers grouped_mm", "fp8": "ep_moe FP8 experts"}


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


def build(preset: str, device, compile_backend: str, variants: list[str]):
    """(ep_moe config, {variant: module}) for the variants asked for, of: the transformers
    block, ep_moe with its weights ("eager", always), that layer compiled, and a copy of it with
    FP8 experts. The block is dropped when not timed, before the FP8 copy is made (DeepSeek-V3's
    bf16 experts are 22.5 GB a copy)."""
    cfg = MoEConfig.preset(preset)
    if "fp8" in variants and fp8_shape(cfg) != cfg:
        cfg = fp8_shape(cfg)
        note(f"{preset}: FP8 block scales need D and I multiples of 128: D, I = "
             f"{cfg.hidden_size}, {cfg.intermediate_size} for every variant")
    torch.manual_seed(0)
    with torch.device(device):  # draw the weights where they live: no fp32 copy on the host
        block = hf_block(preset, cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, cfg.init_std)
    block = block.to(device=device, dtype=torch.bfloat16)
    ours = MoE.from_hf(block)
    modules = {"eager": ours}
    if "compiled" in variants:
        modules["compiled"] = torch.compile(ours, fullgraph=True, dynamic=False,
                                            backend=compile_backend)
    if "grouped_mm" in variants:
        modules["grouped_mm"] = block
    del block
    if "fp8" in variants:
        with torch.no_grad():
            modules["fp8"] = copy.deepcopy(ours).quantize_experts("fp8").eval()
    return ours.config, modules


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
    """Each module's relative error against float64 on its own routing (the FP8 layer's: the
    reference of the same quantization); raises past TOLERANCE."""
    n = min(x.shape[1], CHECK_T)
    errors = {}
    for name, module in modules.items():
        owner = modules["eager"] if name in ("compiled", "grouped_mm") else module
        params = {k: v.detach() for k, v in owner.state_dict().items()}
        with torch.no_grad():
            y = module(x)[0, :n]
        ids = routed_ids(name, module, x)[:n]
        if name == "fp8":  # the per-expert path stores the first product in bf16: so does this
            with torch.no_grad():
                stored = module.plan(x).experts == "per_expert_fp8"
            y_ref = reference_moe_fp8(x[0, :n], params, module.config, topk_ids=ids,
                                      stored_dtype=torch.bfloat16 if stored else None).y
        else:
            y_ref, _, _ = reference_moe(x[0, :n], params, cfg, topk_ids=ids)
        errors[name] = rel(y, y_ref)
        if not errors[name] < TOLERANCE:
            raise SystemExit(f"{VARIANTS[name]}: relative error {errors[name]:.3g} against "
                             f"the float64 reference (T={x.shape[1]}), above {TOLERANCE}")
    return errors


def routed_flops(cfg: MoEConfig, T: int) -> int:
    """3 GEMMs of D x I per routed (token, expert) pair."""
    return 6 * cfg.hidden_size * T * cfg.top_k * cfg.intermediate_size


def floor_ms(cfg: MoEConfig, T: int, hit: int, ceilings: dict, fp8: bool = False) -> float:
    """max(FLOPs / matmul ceiling, bytes of the weights read / copy ceiling) of a forward:
    3 GEMMs of D x I per routed pair and per token through the shared MLP; the hit experts'
    weights and the shared MLP's read once. fp8: the routed experts' weights in e4m3 with their
    block scales and their FLOPs at the FP8 matmul ceiling (the shared MLP stays bf16)."""
    D, I, S = cfg.hidden_size, cfg.intermediate_size, cfg.shared_size
    shared_flops = 6 * D * T * S
    mm, mm_fp8 = ceilings["matmul_ceiling_tflops"], ceilings.get("fp8_matmul_ceiling_tflops")
    routed_tflops = (mm_fp8 or mm) if fp8 else mm
    flop_ms = (routed_flops(cfg, T) / routed_tflops + shared_flops / mm) / 1e9
    weight_bytes = hit * expert_weight_bytes(D, I, fp8=fp8) + 3 * D * S * 2
    return max(flop_ms, weight_bytes / ceilings["copy_ceiling_gbs"] / 1e6)


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
        y_bf16, route = modules["eager"](xs[0], return_router_output=True)
    hit = int((route.num_tokens_per_expert > 0).sum())
    floor = floor_ms(cfg, T, hit, ceilings)
    graph = device.type == "cuda" and T <= GRAPH_MAX_T
    fwd, timer = forward_times(modules, xs, device, graph)
    train, peaks = train_times({k: m for k, m in modules.items() if k != "fp8"}, xs[0], device)
    row = {"preset": preset, "T": T, "experts_hit": hit, "timer": timer,
           "floor_ms": floor, "train_floor_ms": 3 * floor}
    for name in modules:
        row[f"{name}_err_vs_fp64"] = errors[name]
        row[f"{name}_ms"] = fwd[name]
        if name in train:
            row[f"train_{name}_ms"] = train[name]
        if name in peaks:
            row[f"train_{name}_peak_gib"] = peaks[name]
    for prefix in ("", "train_"):
        eager = row[f"{prefix}eager_ms"]
        for name in ("compiled", "grouped_mm"):
            if name in modules:
                row[f"{prefix}{name}_over_eager"] = row[f"{prefix}{name}_ms"] / eager
        row[f"{prefix}eager_over_floor"] = eager / row[f"{prefix}floor_ms"]
    if "fp8" in modules:
        with torch.no_grad():
            y_fp8 = modules["fp8"](xs[0])
        row["fp8_err_vs_bf16"] = rel(y_fp8, y_bf16)
        row["fp8_floor_ms"] = floor_ms(cfg, T, hit, ceilings, fp8=True)
        row["fp8_over_floor"] = row["fp8_ms"] / row["fp8_floor_ms"]
        row["eager_over_fp8"] = row["eager_ms"] / row["fp8_ms"]
        row["fp8_routed_tflops"] = routed_flops(cfg, T) / row["fp8_ms"] / 1e9
    return row


def tables(rows, train_timer: str) -> str:
    headers = {"preset": "shape", "T": "T", "timer": "timer", "floor_ms": "floor",
               "eager_ms": "ep_moe eager", "compiled_ms": "ep_moe compiled",
               "compiled_over_eager": "compiled / eager",
               "grouped_mm_ms": "transformers grouped_mm",
               "grouped_mm_over_eager": "grouped_mm / eager"}
    present = [c for c in headers if any(c in r for r in rows)]
    train_cols = ["preset", "T"] + [f"train_{c}" for c in present[3:]]
    train_headers = {c: headers.get(c.removeprefix("train_"), c) for c in train_cols}
    text = ("forward (no grad), ms\n\n" + markdown_table(rows, present, headers) +
            f"\n\ntraining step (forward + backward), ms, {train_timer}\n\n" +
            markdown_table(rows, train_cols, train_headers))
    if any("fp8_ms" in r for r in rows):
        fp8_headers = {"preset": "shape", "T": "T", "fp8_floor_ms": "FP8 floor",
                       "fp8_ms": "ep_moe FP8", "fp8_over_floor": "FP8 / floor",
                       "eager_ms": "ep_moe bf16", "eager_over_fp8": "bf16 / FP8",
                       "fp8_routed_tflops": "routed TFLOP/s",
                       "fp8_err_vs_fp64": "err vs fp64 (same quant.)",
                       "fp8_err_vs_bf16": "err vs bf16 layer"}
        text += ("\n\nFP8 experts, forward (no grad), ms, the forward table's timer\n\n" +
                 markdown_table(rows, list(fp8_headers), fp8_headers))
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=None,
                   help="mixtral | qwen3 | deepseek_v3 | tiny (default: mixtral qwen3 on a GPU, "
                        "tiny on the CPU)")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help="T per forward (default: 16 512 4096 on a GPU, 16 on the CPU)")
    p.add_argument("--variants", nargs="+", default=["eager", "compiled", "grouped_mm"],
                   choices=["eager", "compiled", "grouped_mm"],
                   help="what to time beside each other (ep_moe eager always runs)")
    p.add_argument("--fp8", action="store_true",
                   help="also the layer with FP8 experts (forward only; CUDA with compute "
                        "capability >= 8.9, or the CPU under TRITON_INTERPRET=1)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor on a GPU; aot_eager on the "
                        "CPU, where inductor's C++ build takes minutes)")
    args = p.parse_args(argv)
    if any(t < 1 for t in args.tokens or []):
        p.error(f"--tokens must be >= 1, got {args.tokens}")
    args.variants = ["eager"] + [v for v in args.variants if v != "eager"] + \
        (["fp8"] if args.fp8 else [])
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
    report = {**run_info(device), "compile_backend": backend, "variants": args.variants,
              "copy_ceiling_gbs": copy_ceiling_gbs(device),
              "matmul_ceiling_tflops": matmul_ceiling_tflops(device), "rows": []}
    if args.fp8:
        report["fp8_matmul_ceiling_tflops"] = fp8_matmul_ceiling_tflops(device)
    fp8_ceiling = report.get("fp8_matmul_ceiling_tflops")
    print(f"# {report['device']}, torch {report['torch']}, triton {report['triton']}: copy "
          f"{report['copy_ceiling_gbs']:.4g} GB/s, bf16 matmul "
          f"{report['matmul_ceiling_tflops']:.4g} TFLOP/s" +
          (f", FP8 matmul {fp8_ceiling:.4g} TFLOP/s" if fp8_ceiling else ""), flush=True)
    for preset in presets:
        cfg, modules = build(preset, device, backend, args.variants)
        for T in tokens:
            row = bench_shape(preset, cfg, modules, T, device, report)
            report["rows"].append(row)
            print(f"{preset} T={T}: checked (errors " + ", ".join(
                f"{n} {row[f'{n}_err_vs_fp64']:.1e}" for n in modules) + "), timed", flush=True)
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
