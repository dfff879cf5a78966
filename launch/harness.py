"""Check the expert-parallel layer against the single-process one, then time it.

    bash launch/run.sh            # every GPU it finds (NCCL), or 2 CPU processes (gloo)
    torchrun --nproc-per-node N launch/harness.py [--preset mixtral] [--tokens 8192] [--plot]

1. Check (fp32, the preset's E / K / routing at reduced D and I): every rank routes its own
   tokens (a different count per rank, one rank with none when W >= 3, tagged by source rank);
   outputs and gradients must match the single-process layer on the same weights and the
   float64 reference; so must the no-grad forward, and with a fixed-size exchange on CUDA its
   CUDA-graph replay (bit for bit the eager output).
2. Time (the preset's full shape, bf16 on GPU): forward and training step, the phases (route,
   dispatch, experts, combine), the exchanges next to a raw all_to_all_single of the same
   bytes, peak memory, and the single-GPU layer on the same tokens per GPU, alternating over
   --rounds so each ratio compares neighbours in time.
3. With --fp8, the same layer with its experts quantized to e4m3 (`quantize_experts("fp8")`,
   inference): checked (fp32 on the CPU, D = I = 128) against the single-process FP8 layer and
   the float64 reference of the same quantization, then its no-grad forward timed against the
   bf16 one and the single-GPU FP8 layer, and its dispatch (e4m3 rows with their scales) against
   the bf16 dispatch: bytes, time, and the raw exchange of those bytes.

Rank 0 prints one short table (one row per dispatcher); every figure of every rank goes to
$OUT/harness_<preset>_W<W>.json ($OUT defaults to ./out), and with --plot the phases of each
rank to a PNG beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (capture_graph, copy_ceiling_gbs, fp8_shape, graph_time_us,  # noqa: E402
                    markdown_table, note, out_dir, run_info, sync, time_fwd_and_fwd_bwd,
                    time_ms, write_json)

import ep_moe  # noqa: E402
from ep_moe import MoE, MoEConfig  # noqa: E402
from ep_moe.distributed import group_rank_and_size, init_distributed  # noqa: E402
from ep_moe.kernels.dispatch_layout import FP8_ROWS, packed_row  # noqa: E402
from ep_moe.reference import reference_moe, reference_moe_fp8  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None,
                   help="tiny | mixtral | qwen3 | deepseek_v3 (default: mixtral on GPU, tiny on CPU)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (T)")
    p.add_argument("--dispatcher", default="all_to_all", choices=["all_to_all", "allgather", "both"])
    p.add_argument("--placement", default="linear", choices=["linear", "round_robin"])
    p.add_argument("--fixed", action="store_true",
                   help="fixed-size exchange: MoEConfig.max_tokens_per_rank = T (no host sync)")
    p.add_argument("--chunks", type=int, default=None,
                   help="with --fixed: MoEConfig.dispatch_chunks, a pipeline whose exchanges "
                        "overlap the experts (default: the layer's choice)")
    p.add_argument("--exchange", default="auto", choices=["auto", "collective", "nvlink"],
                   help="with --fixed: MoEConfig.exchange (nvlink: stores into the peers' "
                        "symmetric memory, inference only; auto: nvlink where the GPUs allow)")
    p.add_argument("--graph", action="store_true",
                   help="also time the no-grad forward as CUDA-graph replays (GPU; the "
                        "expert-parallel layer only with --fixed)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--no-baseline", action="store_true", help="skip the single-GPU layer")
    p.add_argument("--json", default=None, help="file name in the output folder")
    p.add_argument("--plot", action="store_true",
                   help="save a PNG of each rank's phases (route, dispatch, experts, combine) "
                        "beside the JSON (needs matplotlib)")
    p.add_argument("--fp8", action="store_true",
                   help="also the layer with FP8 experts (inference): its check, forward and "
                        "dispatch against bf16's (D and I raised to multiples of 128 if needed)")
    p.add_argument("--rounds", type=int, default=2,
                   help="timing rounds, each the single-GPU layer then the expert-parallel one")
    args = p.parse_args()
    for name in ("tokens", "iters", "rounds"):
        value, least = getattr(args, name), 0 if name == "tokens" else 1
        if value is not None and value < least:
            p.error(f"--{name} must be >= {least}, got {value}")
    return args


def warmup_calls(device) -> int:
    """Untimed calls before each timing: 3 on a GPU; 1 on the CPU, where the Triton
    interpreter is slow and the times only show that the code runs."""
    return 3 if device.type == "cuda" else 1


def timed(fn, device, iters, barrier=None) -> float:
    return time_ms(fn, device, iters, warmup_calls(device), barrier)


def log(rank, *msg):
    if rank == 0:
        print(*msg, flush=True)


# --------------------------------------------------------------------------------------------
# 1. Check
# --------------------------------------------------------------------------------------------

def check_tokens(W: int, D: int, device) -> list[torch.Tensor]:
    """Every rank draws all ranks' tokens from one seed; rank r's are tagged with +r."""
    gen = torch.Generator().manual_seed(1234)
    counts = [(37 + 29 * r) % 97 for r in range(W)]
    if W >= 3:
        counts[1] = 0  # a rank with no tokens
    return [(torch.randn(n, D, generator=gen) + r).to(device) for r, n in enumerate(counts)]


def check(cfg: MoEConfig, group, device) -> dict:
    rank, W = group_rank_and_size(group)
    D = min(cfg.hidden_size, 128)
    xs = check_tokens(W, D, device)
    cap = max(x.shape[0] for x in xs) if cfg.max_tokens_per_rank else None
    small = cfg.replace(hidden_size=D, intermediate_size=min(cfg.intermediate_size, 64),
                        shared_intermediate_size=None, max_tokens_per_rank=cap)
    torch.manual_seed(0)
    full = MoE(small.replace(max_tokens_per_rank=None, dispatch_chunks=None, exchange="auto"),
               device=device)
    torch.manual_seed(0)
    ep = MoE(small, process_group=group, device=device)
    gen = torch.Generator().manual_seed(99)
    grads = [torch.randn(x.shape, generator=gen).to(device) for x in xs]

    x = xs[rank].clone().requires_grad_()
    y = ep(x)
    y.backward(grads[rank])

    x_all = torch.cat(xs).requires_grad_()
    y_all, route = full(x_all, return_router_output=True)
    y_all.backward(torch.cat(grads))
    params = {k: v.detach() for k, v in full.state_dict().items()}
    y_ref, _, _ = reference_moe(x_all.detach(), params, small, topk_ids=route.topk_ids)

    start = sum(t.shape[0] for t in xs[:rank])
    mine = slice(start, start + x.shape[0])

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    expert_grad = full.experts.gate_up_proj.grad[ep.local_expert_ids]
    errors = {
        "out_vs_single": rel(y, y_all[mine]) if x.shape[0] else 0.0,
        "out_vs_fp64": rel(y, y_ref[mine]) if x.shape[0] else 0.0,
        "grad_x_vs_single": rel(x.grad, x_all.grad[mine]) if x.shape[0] else 0.0,
        "grad_experts_vs_single": rel(ep.experts.gate_up_proj.grad, expert_grad),
    }
    # inference: the no-grad forward (with chunks, the pipeline that the gradient path never
    # takes), and with a fixed-size exchange on CUDA the same forward replayed from a CUDA
    # graph, which must give the eager forward's output bit for bit
    with torch.no_grad():
        y_inf = ep(xs[rank])
    errors["inference_vs_single"] = rel(y_inf, y_all[mine]) if x.shape[0] else 0.0
    if device.type == "cuda" and small.max_tokens_per_rank is not None:
        x_static, out = xs[rank].clone(), {}

        def fwd():
            with torch.no_grad():
                out["y"] = ep(x_static)

        dist.barrier(group)
        graph = capture_graph([fwd], 1, "thread_local")
        out["y"].fill_(float("nan"))
        graph.replay()
        sync(device)
        same = torch.equal(out["y"], y_inf)
        errors["graph_vs_eager"] = 0.0 if same else max(rel(out["y"], y_inf), 1.0)
    with torch.no_grad():
        over_nvlink = ep.plan(xs[rank]).exchange == "nvlink"  # the same on every rank
    if over_nvlink:  # the rows and partials the collectives bring (the kernel that stores
        # the partials may round its products' sums differently)
        torch.manual_seed(0)
        ep_collective = MoE(small.replace(exchange="collective"), process_group=group,
                            device=device)
        with torch.no_grad():
            y_collective = ep_collective(xs[rank])
        errors["nvlink_vs_collective"] = rel(y_inf, y_collective) if x.shape[0] else 0.0
    router_grad = ep.router.weight.grad.clone()
    if group is not None:
        dist.all_reduce(router_grad, group=group)  # replicated weights: sum over ranks
    errors["grad_router_vs_single"] = rel(router_grad, full.router.weight.grad)
    worst = torch.tensor(list(errors.values()), dtype=torch.float64, device=device)
    if group is not None:
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    errors = dict(zip(errors, worst.tolist()))
    bad = {k: v for k, v in errors.items() if not v < 1e-4}  # fp32 vs fp32 / fp64
    if bad:
        raise RuntimeError(f"rank {rank}: expert-parallel layer disagrees: {bad}")
    return errors


def check_fp8(cfg: MoEConfig, group, device) -> dict:
    """FP8 experts (inference): the sharded layer, loaded from the single-process FP8 layer's
    state dict, against that layer on every rank's tokens, and against the float64 reference
    of the same quantization; with an all-to-all the rows travel as e4m3 with their scales."""
    rank, W = group_rank_and_size(group)
    xs = check_tokens(W, 128, device)
    cap = max(x.shape[0] for x in xs) if cfg.max_tokens_per_rank else None
    small = cfg.replace(hidden_size=128, intermediate_size=128, shared_intermediate_size=None,
                        max_tokens_per_rank=cap, expert_quant="fp8")
    torch.manual_seed(0)
    full = MoE(small.replace(max_tokens_per_rank=None, dispatch_chunks=None, exchange="auto"),
               device=device).eval()
    ep = MoE(small, process_group=group, device=device).eval()
    ep.load_full_state_dict(full.state_dict())
    start = sum(t.shape[0] for t in xs[:rank])
    mine = slice(start, start + xs[rank].shape[0])
    with torch.no_grad():
        y = ep(xs[rank])
        y_all, route = full(torch.cat(xs), return_router_output=True)
        plan = ep.plan(xs[rank])
    params = {k: v.detach() for k, v in full.state_dict().items()}
    ref = reference_moe_fp8(torch.cat(xs), params, small, topk_ids=route.topk_ids).y

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    errors = {"fp8_out_vs_single": rel(y, y_all[mine]) if xs[rank].shape[0] else 0.0,
              "fp8_out_vs_fp64": rel(y, ref[mine]) if xs[rank].shape[0] else 0.0}
    worst = torch.tensor(list(errors.values()), dtype=torch.float64, device=device)
    if group is not None:
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    errors = dict(zip(errors, worst.tolist()))
    # the sharded layer runs the single-process layer's kernels on the same e4m3 rows; the
    # reference rounds h to e4m3 from float64 sums, which may land one e4m3 step away (2^-4)
    bad = {k: v for k, v in errors.items() if not v < (1e-4 if "single" in k else 1e-2)}
    if bad or plan.experts != "triton_fp8":
        raise RuntimeError(f"rank {rank}: FP8 expert-parallel layer disagrees: {bad}, {plan}")
    return errors


# --------------------------------------------------------------------------------------------
# 2. Time
# --------------------------------------------------------------------------------------------

def raw_all_to_all_ms(nbytes: int, group, device, iters) -> float:
    """An even all_to_all_single of ~nbytes per rank. Each rank's chunk is a whole number of
    128-byte lines: chunks off a 16-byte boundary ran at half speed (Mixtral's mean bytes)."""
    W = dist.get_world_size(group)
    n = max(64, nbytes // 2 // W // 64 * 64) * W
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return timed(lambda: dist.all_to_all_single(dst, src, group=group), device, iters,
                   barrier=lambda: dist.barrier(group))


def time_layer(layer: MoE, T: int, dtype, device, iters, barrier) -> dict:
    D = layer.config.hidden_size
    x = torch.randn(T, D, dtype=dtype, device=device)
    g = torch.randn(T, D, dtype=dtype, device=device)
    res = time_fwd_and_fwd_bwd(layer, x, g, device, iters, barrier,
                               warmup_calls(device))
    res.pop("peak_extra_gib", None)
    return res


def time_graphs(single, layer, T: int, dtype, device, rounds: int, barrier) -> dict:
    """No-grad forward as CUDA-graph replays (the device's time alone, as decode loops run a
    layer): the single-GPU layer and, when its exchange has a fixed size, the expert-parallel
    one, alternating over `rounds`."""
    x = torch.randn(T, layer.config.hidden_size, dtype=dtype, device=device)
    calls = 10 if T <= 256 else 3

    def fwd(m):
        with torch.no_grad():
            m(x)

    samples: dict = {}
    for _ in range(rounds):
        if single is not None:
            samples.setdefault("single_graph_fwd_ms", []).append(
                graph_time_us([lambda: fwd(single)], calls, 20) / 1e3)
        if layer.config.max_tokens_per_rank is not None or layer.world_size == 1:
            if barrier is not None:
                barrier()
            # thread-local capture: NCCL's watchdog thread queries events meanwhile
            samples.setdefault("graph_fwd_ms", []).append(
                graph_time_us([lambda: fwd(layer)], calls, 20, "thread_local") / 1e3)
            if single is not None:
                samples.setdefault("per_gpu_vs_single_graph_fwd", []).append(
                    samples["single_graph_fwd_ms"][-1] / samples["graph_fwd_ms"][-1])
    out = {k: statistics.median(v) for k, v in samples.items()}
    out.update({f"{k}_rounds": v for k, v in samples.items() if "per_gpu" in k})
    return out


def host_ms(fn, device, barrier, iters=10) -> float:
    """Median host time to issue fn() (its host syncs included), the device drained before."""
    times = []
    for _ in range(iters):
        sync(device)
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_phases(layer: MoE, T: int, dtype, device, iters, barrier) -> dict:
    D = layer.config.hidden_size
    # the same tokens on every call (of a rank): the FP8 layer's dispatch sends the same rows
    gen = torch.Generator(device).manual_seed(1 + dist.get_rank() if dist.is_initialized() else 1)
    x = torch.randn(T, D, dtype=dtype, device=device, generator=gen)
    with torch.no_grad():
        plan = layer.plan(x)  # the no-grad forward's, each phase run alone as it would
        rows = {"fp8": True} if plan.fp8_dispatch else {}  # FP8 experts: e4m3 rows out
        route = layer.router(x, topk=plan.router_topk)
        sent = layer.dispatcher.dispatch(x, route.topk_ids, route.topk_weights, **rows)
        partial = layer.compute_experts(sent, plan)
        res = {
            "route_ms": timed(lambda: layer.router(x, topk=plan.router_topk), device, iters,
                              barrier=barrier),
            "dispatch_ms": timed(lambda: layer.dispatcher.dispatch(
                x, route.topk_ids, route.topk_weights, **rows), device, iters, barrier=barrier),
            "experts_ms": timed(lambda: layer.compute_experts(sent, plan), device, iters,
                                barrier=barrier),
            "combine_ms": timed(lambda: layer.dispatcher.combine(partial, sent.handle),
                                device, iters, barrier=barrier),
        }
        res["dispatch_host_ms"] = host_ms(lambda: layer.dispatcher.dispatch(
            x, route.topk_ids, route.topk_weights, **rows), device, barrier, iters)
        row_dtype = FP8_ROWS if plan.fp8_dispatch else x.dtype
        if hasattr(sent.handle, "input_splits"):
            res.update(time_exchanges(sent, partial, row_dtype, device, iters, barrier,
                                      layer.process_group))
    h = sent.handle
    if hasattr(h, "input_splits"):  # all_to_all: rows this rank sends out and gets back
        res["rows_sent"], res["rows_received"] = sum(h.input_splits), sum(h.output_splits)
        width, _ = packed_row(D, route.topk_ids.shape[1], row_dtype)  # a token, its routing
        res["dispatch_bytes"] = res["rows_sent"] * width * row_dtype.itemsize
        res["combine_bytes"] = res["rows_received"] * D * partial.element_size()
    res["local_pairs"] = h.num_local_pairs
    return res


def time_exchanges(sent, partial, row_dtype, device, iters, barrier, group) -> dict:
    """The all-to-alls alone, with the split sizes of a real dispatch: the packed token and
    routing rows out (of `row_dtype`: FP8_ROWS for e4m3 rows), the partial rows back (no
    layout, host sync or gather around them)."""
    h = sent.handle
    D, K = sent.x.shape[1], sent.topk_ids.shape[1]
    width, _ = packed_row(D, K, row_dtype)
    n_out, n_in = sum(h.input_splits), sum(h.output_splits)
    send = torch.ones(n_out, width, dtype=row_dtype, device=device)
    recv = torch.empty(n_in, width, dtype=row_dtype, device=device)
    back = partial.new_empty(n_out, D)

    def out():
        dist.all_to_all_single(recv, send, list(h.output_splits), list(h.input_splits),
                               group=group)

    def home():
        dist.all_to_all_single(back, partial, list(h.input_splits), list(h.output_splits),
                               group=group)

    return {"dispatch_exchange_ms": timed(out, device, iters, barrier=barrier),
            "combine_exchange_ms": timed(home, device, iters, barrier=barrier)}


def bench(cfg: MoEConfig, args, group, device, dtype) -> dict:
    rank, W = group_rank_and_size(group)
    T, iters = args.tokens, args.iters
    barrier = (lambda: dist.barrier(group)) if group is not None else None
    out = {"dispatcher": cfg.dispatcher, "W": W, "T_per_rank": T,
           "max_tokens_per_rank": cfg.max_tokens_per_rank, "chunks": cfg.dispatch_chunks,
           "exchange": cfg.exchange}
    single = None
    if not args.no_baseline:
        torch.manual_seed(0)
        single = MoE(cfg, device=device, dtype=dtype)
    torch.manual_seed(0)
    layer = MoE(cfg, process_group=group, device=device, dtype=dtype)
    x = torch.empty(T, cfg.hidden_size, dtype=dtype, device=device)
    with torch.no_grad():
        inference = layer.plan(x)
    out["plan_inference"] = dataclasses.asdict(inference)  # eager; a CUDA graph may chunk
    out["plan_training"] = dataclasses.asdict(layer.plan(x.requires_grad_()))
    # each timing of the layer follows one of the single-GPU layer on the same tokens, over
    # `rounds`: the clocks drift as the GPUs heat up, so each ratio compares neighbours, and
    # the report gives the median of the rounds (and each round's ratio)
    samples: dict = {}
    for _ in range(args.rounds):
        if single is not None:
            for k, v in time_layer(single, T, dtype, device, iters, None).items():
                samples.setdefault(f"single_{k}", []).append(v)
        for k, v in time_layer(layer, T, dtype, device, iters, barrier).items():
            samples.setdefault(k, []).append(v)
        if single is not None:
            for k in ("fwd", "fwd_bwd"):
                ratio = samples[f"single_{k}_ms"][-1] / samples[f"{k}_ms"][-1]
                samples.setdefault(f"per_gpu_vs_single_{k}", []).append(ratio)
    out.update({k: statistics.median(v) for k, v in samples.items()})
    out.update({f"{k}_rounds": v for k, v in samples.items() if "per_gpu" in k})
    if single is not None:  # each layer's weights sat beside the other's timings: not its memory
        for prefix, other in (("peak_mem_gib", single), ("single_peak_mem_gib", layer)):
            resident = sum(p.numel() * p.element_size() for p in other.parameters()) / 2**30
            for k in [k for k in out if k.startswith(prefix)]:
                out[k] -= resident
    if args.graph and device.type == "cuda":
        out.update(time_graphs(single, layer, T, dtype, device, args.rounds, barrier))
    if inference.exchange != "nvlink":  # the phases are the collectives' (nvlink: one piece)
        out.update(time_phases(layer, T, dtype, device, iters, barrier))
    if args.fp8:
        out.update(bench_fp8(single, layer, out, args, device, dtype, barrier))
    del single
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["tokens_per_s"] = T / out["fwd_ms"] * 1e3
    out["fwd_bwd_tokens_per_s"] = T / out["fwd_bwd_ms"] * 1e3
    for pre in ("", "fp8_"):
        if group is None or f"{pre}dispatch_bytes" not in out:
            continue
        for phase in (f"{pre}dispatch", f"{pre}combine"):
            # the raw exchange is even: give it the ranks' mean bytes, and judge ours by it too
            mean = torch.tensor([float(out[f"{phase}_bytes"])], device=device)
            dist.all_reduce(mean, group=group)
            nbytes = int(mean.item() / W)
            raw = min(raw_all_to_all_ms(nbytes, group, device, iters) for _ in range(2))
            out[f"{phase}_raw_a2a_ms"] = raw
            out[f"{phase}_busbw_gbs"] = nbytes * (W - 1) / W / out[f"{phase}_ms"] / 1e6
            out[f"{phase}_raw_busbw_gbs"] = nbytes * (W - 1) / W / raw / 1e6
            out[f"{phase}_vs_raw"] = raw / out[f"{phase}_ms"]
            if f"{phase}_exchange_ms" in out:
                out[f"{phase}_exchange_vs_raw"] = raw / out[f"{phase}_exchange_ms"]
    del layer
    return out


def bench_fp8(single, layer: MoE, bf16: dict, args, device, dtype, barrier) -> dict:
    """The layers' experts quantized to e4m3 in place: the no-grad forward against the bf16
    one (`bf16`, this run's figures) and the single-GPU FP8 layer, over the same rounds; the
    dispatch's bytes and time against bf16's. Keys start with fp8_."""
    T, iters = args.tokens, args.iters
    for m in (single, layer):
        if m is not None:
            m.quantize_experts("fp8").eval()
    x = torch.randn(T, layer.config.hidden_size, dtype=dtype, device=device)

    def fwd(m):
        def call():
            with torch.no_grad():
                m(x)
        return call

    samples: dict = {}
    for _ in range(args.rounds):
        if single is not None:
            samples.setdefault("single_fwd_ms", []).append(timed(fwd(single), device, iters))
        samples.setdefault("fwd_ms", []).append(timed(fwd(layer), device, iters, barrier))
        if single is not None:
            samples.setdefault("per_gpu_vs_single_fwd", []).append(
                samples["single_fwd_ms"][-1] / samples["fwd_ms"][-1])
    out = {f"fp8_{k}": statistics.median(v) for k, v in samples.items()}
    out.update({f"fp8_{k}_rounds": v for k, v in samples.items() if "per_gpu" in k})
    out["fp8_fwd_vs_bf16"] = bf16["fwd_ms"] / out["fp8_fwd_ms"]
    out["fp8_tokens_per_s"] = T / out["fp8_fwd_ms"] * 1e3
    with torch.no_grad():
        exchange = layer.plan(x).exchange
    if exchange != "nvlink":
        phases = time_phases(layer, T, dtype, device, iters, barrier)
        out.update({f"fp8_{k}": v for k, v in phases.items()})
        if "dispatch_bytes" in phases and bf16.get("dispatch_bytes"):
            out["fp8_dispatch_bytes_vs_bf16"] = phases["dispatch_bytes"] / bf16["dispatch_bytes"]
            out["fp8_dispatch_vs_bf16"] = bf16["dispatch_ms"] / phases["dispatch_ms"]
            out["fp8_dispatch_exchange_vs_bf16"] = \
                bf16["dispatch_exchange_ms"] / phases["dispatch_exchange_ms"]
    return out


def median_over_ranks(runs: list[dict]) -> dict:
    """{ratio}_median: the median of a per-GPU ratio over every rank's rounds (each rank
    records one paired ratio per round, under {ratio}_rounds)."""
    keys = sorted({k for run in runs for k in run if k.endswith("_rounds")})
    return {k[:-len("_rounds")] + "_median": statistics.median(v for run in runs for v in run[k])
            for k in keys}


# --------------------------------------------------------------------------------------------
# 3. Report
# --------------------------------------------------------------------------------------------

SCREEN = {"run": "run", "W": "W", "T_per_rank": "T/rank", "tokens_per_s": "tokens/s",
          "fwd_ms": "fwd ms", "fwd_bwd_ms": "step ms", "fwd_vs_1gpu": "fwd vs 1 GPU",
          "step_vs_1gpu": "step vs 1 GPU", "exchange_vs_raw": "exchange vs raw",
          "peak_gib": "peak GiB"}


def screen_row(cfg: MoEConfig, runs: list[dict], summary: dict, pre: str = "") -> dict:
    """One line of the first screen. Times: the slowest rank's (the layer ends when it does);
    ratios: medians over ranks and rounds; peak memory: the largest rank's. pre "fp8_": the
    line of the FP8 experts (forward only)."""
    plan = runs[0]["plan_inference"]  # the no-grad forward's exchange and chunks
    label = "one rank" if plan["exchange"] == "none" else \
        f"{cfg.dispatcher}, {plan['exchange']}" + \
        (f", {plan['chunks']} chunks" if plan["chunks"] > 1 else "") + \
        (", FP8 experts" if pre else "")
    slowest = max(runs, key=lambda r: r[f"{pre}fwd_ms"])
    row = {"run": label, "W": len(runs), "T_per_rank": slowest["T_per_rank"],
           "tokens_per_s": slowest["T_per_rank"] / slowest[f"{pre}fwd_ms"] * 1e3,
           "fwd_ms": slowest[f"{pre}fwd_ms"],
           "fwd_vs_1gpu": summary.get(f"{pre}per_gpu_vs_single_fwd_median")}
    if not pre:
        row["fwd_bwd_ms"] = max(r["fwd_bwd_ms"] for r in runs)
        row["step_vs_1gpu"] = summary.get("per_gpu_vs_single_fwd_bwd_median")
    ratios = [[r.get(f"{pre}{phase}_exchange_vs_raw") for r in runs]
              for phase in ("dispatch", "combine")]
    if all(v is not None for vs in ratios for v in vs):
        out, back = (statistics.median(vs) for vs in ratios)
        row["exchange_vs_raw"] = f"{out:.2f} / {back:.2f}"  # rows out / partials back
    peaks = [r["peak_mem_gib"] for r in runs if "peak_mem_gib" in r]
    row["peak_gib"] = max(peaks) if peaks and not pre else None
    if pre:
        for key in ("fp8_fwd_vs_bf16", "fp8_dispatch_bytes_vs_bf16", "fp8_dispatch_vs_bf16",
                    "fp8_dispatch_exchange_vs_bf16"):
            values = [r[key] for r in runs if key in r]
            if values:
                row[key] = statistics.median(values)
    if "graph_fwd_ms" in slowest and not pre:
        row["graph_fwd_ms"] = max(r["graph_fwd_ms"] for r in runs)
        row["graph_vs_1gpu"] = summary.get("per_gpu_vs_single_graph_fwd_median")
    return row


def print_screen(rows: list[dict], path: str) -> None:
    print("\n" + markdown_table(rows, list(SCREEN), SCREEN))
    for r in rows:
        if "fp8_fwd_vs_bf16" in r:
            line = f"{r['run']}: forward {r['fp8_fwd_vs_bf16']:.3g}x as fast as bf16's"
            if "fp8_dispatch_bytes_vs_bf16" in r:
                line += (f"; rows out: {r['fp8_dispatch_bytes_vs_bf16']:.3g}x bf16's bytes, "
                         f"the dispatch {r['fp8_dispatch_vs_bf16']:.3g}x and its exchange "
                         f"{r['fp8_dispatch_exchange_vs_bf16']:.3g}x as fast")
            print(line)
        if "graph_fwd_ms" in r:
            ratio = r.get("graph_vs_1gpu")
            print(f"{r['run']}: CUDA-graph forward {r['graph_fwd_ms']:.3g} ms" +
                  (f", {ratio:.3g} per GPU of one GPU's" if ratio is not None else ""))
    print("tokens/s: one rank's forward; step: a training step (forward + backward); times: the "
          "slowest rank's.\n'vs 1 GPU': per-GPU throughput against the single-GPU layer on the "
          "same tokens (median over ranks and rounds).\nexchange: rows out / partials back, "
          "against a raw all_to_all_single of the same bytes.\n"
          f"every figure: {path}", flush=True)


PHASES = ("route", "dispatch", "experts", "combine")


def plot_phases(report: dict, path: str) -> str | None:
    """A PNG of each run's phases per rank (stacked bars, ms); None when there is nothing to
    plot or matplotlib is missing (a note says which)."""
    runs = [run for run in report["runs"]
            if all(f"{p}_ms" in r for r in run["per_rank"] for p in PHASES)]
    if not runs:
        note("--plot: no run timed its phases (the nvlink exchange runs in one piece)")
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note("--plot needs matplotlib (pip install matplotlib); no PNG written")
        return None
    fig, axes = plt.subplots(len(runs), 1, squeeze=False,
                             figsize=(9, 1.2 + 0.45 * report["W"] * len(runs)))
    colors = ("tab:gray", "tab:blue", "tab:orange", "tab:green")
    for ax, run in zip(axes[:, 0], runs):
        ranks = list(range(len(run["per_rank"])))
        left = [0.0] * len(ranks)
        for phase, color in zip(PHASES, colors):
            ms = [r[f"{phase}_ms"] for r in run["per_rank"]]
            ax.barh(ranks, ms, left=left, color=color, label=phase)
            left = [a + b for a, b in zip(left, ms)]
        ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
        ax.invert_yaxis()
        ax.set_title(f"{report['preset']}, {run['dispatcher']}, W={report['W']}, "
                     f"T/rank={run['per_rank'][0]['T_per_rank']}", fontsize=9)
        ax.set_xlabel("ms, each phase timed alone")
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{report['device']}, torch {report['torch']}, {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main():
    args = parse_args()
    group = init_distributed()
    rank, W = group_rank_and_size(group)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    args.preset = args.preset or ("mixtral" if on_gpu else "tiny")
    if args.tokens is None:
        args.tokens = 8192 if on_gpu else 64
    if args.iters is None:
        args.iters = 20 if on_gpu else 3
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    dispatchers = ["all_to_all", "allgather"] if args.dispatcher == "both" else [args.dispatcher]
    backend = dist.get_backend(group) if group is not None else "none"
    info = run_info(device)
    log(rank, f"# ep_moe harness: W={W} backend={backend} device={info['device']} "
              f"preset={args.preset} T/rank={args.tokens} dtype={dtype} "
              f"torch {info['torch']} triton {info['triton']}")
    if not on_gpu:
        log(rank, "note: no GPU: gloo on CPU processes; the check is real, the times only show "
                  "that each path runs")
    report = {"W": W, "backend": backend, **info, "preset": args.preset,
              "package": os.path.dirname(ep_moe.__file__), "checks": {}, "runs": [],
              "screen": []}
    cap = args.tokens if args.fixed else None

    def config(kind):
        chunks = args.chunks if kind == "all_to_all" else None
        exchange = args.exchange if kind == "all_to_all" else "auto"
        cfg = MoEConfig.preset(args.preset, dispatcher=kind, placement=args.placement,
                               max_tokens_per_rank=cap, dispatch_chunks=chunks,
                               exchange=exchange)
        return fp8_shape(cfg) if args.fp8 else cfg

    for kind in dispatchers:
        cfg = config(kind)
        report["checks"][kind] = check(cfg, group, device)
        if args.fp8:
            report["checks"][kind].update(check_fp8(cfg, group, device))
        log(rank, f"check {kind}: OK " + " ".join(
            f"{k}={v:.1e}" for k, v in report["checks"][kind].items()))
    if not args.check_only:
        if on_gpu:
            report["copy_ceiling_gbs"] = copy_ceiling_gbs(device)
        for kind in dispatchers:
            cfg = config(kind)
            run = bench(cfg, args, group, device, dtype)
            runs = [None] * W
            if group is not None:
                dist.all_gather_object(runs, run, group=group)
            else:
                runs = [run]
            summary = median_over_ranks(runs)
            report["runs"].append({"dispatcher": kind, "per_rank": runs, "summary": summary})
            report["screen"].append(screen_row(cfg, runs, summary))
            if args.fp8:
                report["screen"].append(screen_row(cfg, runs, summary, "fp8_"))
            log(rank, f"timed {kind}")
    if rank == 0:
        name = args.json or f"harness_{args.preset}_W{W}.json"
        path = write_json(name, report)
        if report["screen"]:
            print_screen(report["screen"], path)
        else:
            print(f"wrote {path}")
        if args.plot and report["runs"]:
            png = plot_phases(report, os.path.join(out_dir(), name.removesuffix(".json") +
                                                   "_phases.png"))
            if png:
                print(f"wrote {png}")
    if group is not None:
        dist.barrier(group)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
