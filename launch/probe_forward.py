"""Where an expert-parallel forward spends its time, and what some alternatives would cost.

    torchrun --nproc-per-node N launch/probe_forward.py [--preset qwen3] [--tokens 8192]

Measurements only (nothing here is used by the layer), each reported by rank 0 and saved as
JSON under $OUT:
1. timeline: one forward replayed step by step as `AllToAllDispatcher` runs it, with the host
   clock and a CUDA event at every step boundary (median over iterations, ms from the start):
   where the host is ahead of the device and where the device waits for the host;
2. host microseconds per call of the pieces the forward issues (device drained before);
3. stacked: L forwards of the layer back to back, single GPU and expert-parallel, per layer,
   as a model runs its layers (the host may run ahead of the device across layers);
4. router: fp32 logits (x.float() @ w.float()) against a bf16 GEMM with fp32 output;
5. padded exchange: the rows' all-to-all at a fixed capacity of T rows per peer (no split
   sizes needed on the host) next to the exact bytes;
6. overlap: the experts' GEMMs with an all-to-all on a side stream, at SM carve-outs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir, time_ms, write_json  # noqa: E402
from harness import raw_all_to_all_ms  # noqa: E402

from ep_moe import MoE, MoEConfig  # noqa: E402
from ep_moe.dispatch import AllToAllHandle, Dispatched  # noqa: E402
from ep_moe.dispatch.collectives import _exchange_rows  # noqa: E402
from ep_moe.dispatch.dispatchers import _unpack_routing  # noqa: E402
from ep_moe.distributed import init_distributed  # noqa: E402
from ep_moe.kernels.dispatch_layout import (META_COPIES, META_PAIRS, dispatch_layout,  # noqa: E402
                                            gather_send_rows, packed_row)
from ep_moe.permute import sum_rows  # noqa: E402


def spin(ms: float) -> None:
    """Keep the host busy for ms (a core that waited in a sync may have clocked down)."""
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def timeline(layer: MoE, x: torch.Tensor, spin_ms: float = 0.0) -> list[tuple[str, float, float]]:
    d = layer.dispatcher
    marks = []
    spin(spin_ms)

    def mark(name):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append((name, time.perf_counter(), ev))

    mark("start")
    route = layer.router(x)
    mark("route")
    ids, weights = route.topk_ids, route.topk_weights
    T, K = ids.shape
    owner, table = d._owner_and_table(x.device)
    layout = dispatch_layout(ids, owner, table)
    mark("layout")
    work = dist.all_to_all_single(layout.recv_meta, layout.send_meta, group=d.group,
                                  async_op=True)
    mark("meta_a2a_issued")
    send = gather_send_rows(x, weights, ids, layout)
    mark("gather")
    work.wait()
    sent, received = layout.meta.tolist()
    mark("sync")
    input_splits = tuple(r[META_COPIES] for r in sent)
    output_splits = tuple(r[META_COPIES] for r in received)
    recv_x, recv_routing = _exchange_rows(send[:sum(input_splits)],
                                          (output_splits, input_splits), x.shape[1], K, d.group)
    mark("rows_a2a_issued")
    recv_ids, recv_weights = _unpack_routing(recv_routing, K)
    num_pairs = sum(sum(r[META_PAIRS:]) for r in received)
    handle = AllToAllHandle(T, num_pairs, layout.copy_index, input_splits, output_splits)
    mark("unpack")
    partial = layer.compute_experts(Dispatched(recv_x, recv_ids, recv_weights, handle))
    mark("experts")
    y = d.combine(partial, handle)
    mark("combine")
    torch.cuda.synchronize()
    t0, e0 = marks[0][1], marks[0][2]
    del y
    return [(n, (t - t0) * 1e3, e0.elapsed_time(e)) for n, t, e in marks]


def host_us(fn, n=20, rounds=5) -> float:
    times = []
    for _ in range(rounds + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times[1:])


@triton.jit
def _tiny(a_ptr, b_ptr, n0, n1, n2, n3, n4, n5, n6, n7, BLOCK: tl.constexpr):
    """A launch with a dozen arguments that does next to nothing: Triton's host cost alone."""
    i = tl.arange(0, BLOCK)
    tl.store(b_ptr + i, tl.load(a_ptr + i))


def profile_host(fn, n=20, top=45) -> str:
    """cProfile of n calls: where the host time goes, by own time and by cumulative time."""
    import cProfile
    import io
    import pstats
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumtime").print_stats(top)
    return text.getvalue()


def router_variants(layer: MoE, x: torch.Tensor, iters) -> dict:
    w = layer.router.weight
    out = {}
    ref = torch.nn.functional.linear(x.float(), w.float())
    out["fp32_ms"] = time_ms(lambda: torch.nn.functional.linear(x.float(), w.float()),
                             x.device, iters)
    out["route_ms"] = time_ms(lambda: layer.router(x), x.device, iters)
    try:
        alt = torch.mm(x, w.t(), out_dtype=torch.float32)
        out["mm_out_fp32_ms"] = time_ms(lambda: torch.mm(x, w.t(), out_dtype=torch.float32),
                                        x.device, iters)
        out["mm_out_fp32_max_abs_diff"] = (alt - ref).abs().max().item()
        K = layer.config.top_k
        same = (alt.topk(K, -1).indices == ref.topk(K, -1).indices).all(-1).float().mean()
        out["mm_out_fp32_same_topk_frac"] = same.item()
        xg, wg = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        torch.mm(xg, wg.t(), out_dtype=torch.float32).sum().backward()
        out["mm_out_fp32_backward"] = f"ok {xg.grad.dtype} {wg.grad.dtype}"
    except Exception as e:  # noqa: BLE001 (a probe: report what failed)
        out["mm_out_fp32_error"] = repr(e)[:300]
    return out


def overlap(layer: MoE, sent: Dispatched, nbytes: int, group, iters) -> dict:
    dev = sent.x.device
    W = dist.get_world_size(group)
    n = max(64, nbytes // 2 // W // 64 * 64) * W
    src = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    side = torch.cuda.Stream()
    barrier = lambda: dist.barrier(group)  # noqa: E731

    def comm():
        dist.all_to_all_single(dst, src, group=group)

    def both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dist.all_to_all_single(dst, src, group=group)
        layer.compute_experts(sent)
        torch.cuda.current_stream().wait_stream(side)

    res = {}
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    for carve in (0, 8, 16, 32):
        if carve and setter is None:
            break
        try:
            if setter is not None:
                setter(carve if carve else None)
            with torch.no_grad():
                res[f"carve{carve}"] = {
                    "experts_ms": time_ms(lambda: layer.compute_experts(sent), dev, iters,
                                          barrier=barrier),
                    "a2a_ms": time_ms(comm, dev, iters, barrier=barrier),
                    "both_ms": time_ms(both, dev, iters, barrier=barrier),
                }
        except Exception as e:  # noqa: BLE001
            res[f"carve{carve}"] = repr(e)[:300]
    if setter is not None:
        setter(None)
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen3")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--all", action="store_true", help="also the exchange and overlap probes")
    args = p.parse_args()
    group = init_distributed()
    device = torch.device("cuda")
    rank, W = dist.get_rank(), dist.get_world_size()
    dtype, T = torch.bfloat16, args.tokens
    cfg = MoEConfig.preset(args.preset)
    torch.manual_seed(0)
    layer = MoE(cfg, process_group=group, device=device, dtype=dtype)
    torch.manual_seed(0)
    single = MoE(cfg, device=device, dtype=dtype)
    x = torch.randn(T, cfg.hidden_size, dtype=dtype, device=device)
    barrier = lambda: dist.barrier(group)  # noqa: E731
    res = {"preset": args.preset, "W": W, "T": T, "device": torch.cuda.get_device_name()}

    with torch.no_grad():
        for _ in range(3):
            timeline(layer, x)
        for spin_ms in (0.0, 3.0):
            rows = []
            for _ in range(args.iters):
                barrier()
                rows.append(timeline(layer, x, spin_ms))
            names = [n for n, _, _ in rows[0]]
            res[f"timeline_spin{spin_ms:g}"] = {
                n: {"host_ms": statistics.median(r[i][1] for r in rows),
                    "gpu_ms": statistics.median(r[i][2] for r in rows)}
                for i, n in enumerate(names)}

        # host cost of the pieces
        route = layer.router(x)
        ids, weights = route.topk_ids, route.topk_weights
        owner, table = layer.dispatcher._owner_and_table(device)
        layout = dispatch_layout(ids, owner, table)
        sent = layer.dispatcher.dispatch(x, ids, weights)
        partial = layer.compute_experts(sent)
        res["host_us"] = {
            "router": host_us(lambda: layer.router(x)),
            "dispatch_layout": host_us(lambda: dispatch_layout(ids, owner, table)),
            "gather_send_rows": host_us(lambda: gather_send_rows(x, weights, ids, layout)),
            "compute_experts": host_us(lambda: layer.compute_experts(sent)),
            "sum_rows": host_us(lambda: sum_rows(partial, sent.handle.copy_index)),
            "torch_add": host_us(lambda: torch.add(x, 1.0)),
            "tolist_sync": host_us(lambda: layout.meta.tolist()),
            "triton_tiny_launch": host_us(lambda: _tiny[(1,)](x, x, 1, 2, 3, 4, 5, 6, 7, 8,
                                                               BLOCK=16)),
        }

        # stacked layers
        L = args.layers

        def stack(m):
            return lambda: [m(x) for _ in range(L)]

        res["stacked"] = {}
        for rnd in range(2):
            s = time_ms(stack(single), device, args.iters) / L
            e = time_ms(stack(layer), device, args.iters, barrier=barrier) / L
            one_s = time_ms(lambda: single(x), device, args.iters)
            one_e = time_ms(lambda: layer(x), device, args.iters, barrier=barrier)
            res["stacked"][f"round{rnd}"] = {
                "single_per_layer_ms": s, "ep_per_layer_ms": e, "stacked_ratio": s / e,
                "single_one_ms": one_s, "ep_one_ms": one_e, "one_ratio": one_s / one_e}

        res["router"] = router_variants(layer, x, args.iters)
        ep_text = profile_host(lambda: layer(x))
        single_text = profile_host(lambda: single(x))
        if rank == 0:
            for name, text in (("ep", ep_text), ("single", single_text)):
                with open(os.path.join(out_dir(), f"cprofile_{args.preset}_{name}.txt"), "w") as f:
                    f.write(text)

    if args.all:  # padded exchange: T rows per peer, whatever the routing
        width, _ = packed_row(cfg.hidden_size, cfg.top_k, dtype)
        exact = sum(sent.handle.input_splits) * width * 2
        padded = W * T * width * 2
        res["exchange"] = {
            "exact_bytes": exact, "padded_bytes": padded,
            "exact_even_ms": raw_all_to_all_ms(exact, group, device, args.iters),
            "padded_even_ms": raw_all_to_all_ms(padded, group, device, args.iters),
        }
        res["overlap"] = overlap(layer, sent, exact, group, args.iters)

    if rank == 0:
        import json
        print(json.dumps(res, indent=1), flush=True)
        write_json(f"probe_forward_{args.preset}_W{W}.json", res)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
