"""A persistent grouped GEMM whose tile and K loops are flattened into one pipelined loop
(`tl.range(..., flatten=True)`), against the library's grouped GEMM, torch's, and cuBLAS's
batched product on the same rows split evenly, one GPU.

probe_loop.py (stop 16, H100) found cuBLAS's batched product at 1.06-1.28x the floor on
Qwen3's balanced shapes where ours runs at 1.28-1.54x: with 128 x 256 tiles, K = 768 is 12
iterations of the K loop, and each program fills its pipeline and drains its accumulator
alone on its SM. Flattened, the loads of a program's next tile start while this tile's last
products run (Triton's software pipeliner; no warp specialisation, which hangs on Hopper in
triton 3.6). Both operands' tiles come in through tensor descriptors except gathered rows.

Each variant is checked against torch's path first, then all are timed by CUDA-graph replay,
twice. Writes probe_flat.json under $OUT.

    python launch/probe_flat.py [--presets qwen3 mixtral] [--tokens 512 4096 16384]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (graph_time_us, layer_cases, on_off, spans, write_json,  # noqa: E402
                    write_layer_rows)
from sweep_gemm import ceilings, gemm_cases, rel  # noqa: E402

from ep_moe.experts import _grouped_mm  # noqa: E402
from ep_moe.kernels.activation import ACTIVATIONS, _act_and_grad, gated_activation  # noqa: E402
from ep_moe.kernels.grouped_gemm import GemmConfig, grouped_gemm  # noqa: E402

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


@triton.jit
def _flat_kernel(
    a_ptr, a_rows_ptr, w_desc, out_ptr, counts_ptr,
    N, K, num_experts, num_pid_m, num_rows, num_a_rows, w_rows_per_expert,
    stride_am, stride_om,
    GATHER: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    e = tl.arange(0, E_POW2)
    counts = tl.maximum(tl.load(counts_ptr + e, mask=e < num_experts, other=0).to(tl.int32), 0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_ends = tl.cumsum(blocks, 0)
    row_ends = tl.cumsum(counts, 0)
    real_m = tl.minimum(tl.sum(blocks), num_pid_m)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = real_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    ks = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        group = tile // (GROUP_M * num_pid_n)
        first_m = group * GROUP_M
        group_m = tl.minimum(real_m - first_m, GROUP_M)
        pid_m = first_m + (tile % (GROUP_M * num_pid_n)) % group_m
        pid_n = (tile % (GROUP_M * num_pid_n)) // group_m
        expert = tl.sum((block_ends <= pid_m).to(tl.int32))
        mine = e == expert
        row_end = tl.sum(tl.where(mine, row_ends, 0))
        first_block = tl.sum(tl.where(mine, block_ends - blocks, 0))
        first_row = row_end - tl.sum(tl.where(mine, counts, 0)) + (pid_m - first_block) * BLOCK_M
        rows = first_row + tl.arange(0, BLOCK_M)
        row_ok = (rows < row_end) & (rows < num_rows)
        if GATHER:
            a_row = tl.load(a_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            a_ok = row_ok & (a_row >= 0) & (a_row < num_a_rows)
        w_first = expert * w_rows_per_expert + pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            k0 = ki * BLOCK_K
            if GATHER:
                a = tl.load(a_ptr + a_row[:, None] * stride_am + (k0 + ks)[None, :],
                            mask=a_ok[:, None] & ((k0 + ks) < K)[None, :], other=0.0)
            else:
                a = a_ptr.load([first_row, k0])
            acc = tl.dot(a, w_desc.load([w_first, k0]).T, acc)
            if GATED:
                acc_up = tl.dot(a, w_desc.load([w_first + N, k0]).T, acc_up)
        if GATED:
            acc, _ = _act_and_grad(acc, ACT)
            acc = acc * acc_up
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < N)[None, :])


def flat_gemm(a, w, counts, cfg: GemmConfig, a_rows=None, activation=None, flatten=True,
              programs=None):
    """grouped_gemm's product (gated activation when `activation`), persistent and flattened."""
    E, n_total, k_dim = w.shape
    gated = activation is not None
    n_out = n_total // 2 if gated else n_total
    num_rows = a_rows.shape[0] if a_rows is not None else a.shape[0]
    out = a.new_empty(num_rows, n_out)
    w_desc = TensorDescriptor.from_tensor(w.view(E * n_total, k_dim), [cfg.block_n, cfg.block_k])
    a_arg = a if a_rows is not None else TensorDescriptor.from_tensor(
        a, [cfg.block_m, cfg.block_k])
    num_pid_m = triton.cdiv(num_rows, cfg.block_m) + E
    if programs is None:
        programs = torch.cuda.get_device_properties(a.device).multi_processor_count
    _flat_kernel[(programs,)](
        a_arg, a_rows if a_rows is not None else a, w_desc, out, counts,
        n_out, k_dim, E, num_pid_m, num_rows, a.shape[0], n_total, a.stride(0), out.stride(0),
        GATHER=a_rows is not None, GATED=gated, ACT=ACTIVATIONS[activation or "silu"],
        E_POW2=triton.next_power_of_2(E), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, FLATTEN=flatten,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


# (block_m, block_n, block_k, group_m, warps, stages)
CONFIGS = {
    1: [(128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 64, 64, 8, 4, 4),
        (128, 128, 64, 8, 4, 3), (64, 128, 64, 8, 4, 4)],
    2: [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 64, 8, 8, 4),
        (128, 128, 64, 8, 4, 4), (128, 128, 128, 8, 8, 3)],
}


def layer_rows(presets, tokens, dev):
    """The library's down projection and the single-GPU layer's no-grad graph forward with
    `flatten_wins` as shipped and forced off (the grid), in turn, four rounds."""
    import ep_moe.kernels.grouped_gemm as gg
    shipped = gg.flatten_wins

    def switch(on):
        gg.flatten_wins = shipped if on else (lambda *a, **k: False)

    rows = []
    for preset, cfg, layer, T, fwd in layer_cases(presets, tokens, dev):
        P = T * cfg.top_k
        h = torch.randn(P, cfg.intermediate_size, device=dev, dtype=torch.bfloat16)
        ids = torch.randint(0, cfg.num_experts, (P,), device=dev)
        counts = torch.bincount(ids, minlength=cfg.num_experts)
        w2 = layer.experts.down_proj
        down = lambda: grouped_gemm(h, w2, counts, persistent=None)  # noqa: E731
        outs, times = on_off({"down": down, "layer": fwd}, switch, 2 if T >= 4096 else 10)
        row = {"preset": preset, "T": T, "what": "flatten_on_off",
               "flattens": shipped(gg.gemm_config(P / cfg.num_experts, False, 2,
                                                  num_experts=cfg.num_experts),
                                   True, cfg.num_experts),
               "down_equal": torch.equal(*outs["down"]),
               "layer_equal": torch.equal(*outs["layer"]), **times}
        rows.append(row)
        print(row, flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layer", action="store_true",
                   help="the shipped policy on and off: down projection and layer forward")
    p.add_argument("--presets", nargs="+", default=["qwen3", "mixtral"])
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096, 16384])
    p.add_argument("--smoke", action="store_true", help="one small case, each variant once")
    args = p.parse_args()
    dev = torch.device("cuda")
    if args.layer:
        rows = layer_rows(args.presets, args.tokens, dev)
        write_layer_rows("probe_flat_layer.json", rows)
        for r in rows:
            print(f"{r['preset']:8s} T={r['T']:6d} flattens={r['flattens']} down on/off "
                  f"{min(r['down_on_us']):.1f}/{min(r['down_off_us']):.1f} us, layer on/off "
                  f"{spans(r['layer_on_us'])} against {spans(r['layer_off_us'])} us")
        return
    copy_gbs, mm_tflops = ceilings(dev)
    rows = []
    for preset, T, K, w13, w2, case in gemm_cases(args.presets, args.tokens, dev, copy_gbs,
                                                  mm_tflops):
        x, src, counts, offs, h_ref, y_ref, floors = case
        E = w13.shape[0]
        P = T * K
        M = P // E
        xb, hb = x[src][:M * E].view(E, M, -1), h_ref[:M * E].view(E, M, -1)
        variants = {
            (1, "torch"): lambda: gated_activation(
                _grouped_mm(x[src], w13.transpose(1, 2), offs=offs), "silu"),
            (1, "ours"): lambda: grouped_gemm(x, w13, counts, a_rows=src, activation="silu"),
            (1, "bmm"): lambda: torch.bmm(xb, w13.transpose(1, 2)),
            (2, "torch"): lambda: _grouped_mm(h_ref, w2.transpose(1, 2), offs=offs),
            (2, "ours"): lambda: grouped_gemm(h_ref, w2, counts),
            (2, "bmm"): lambda: torch.bmm(hb, w2.transpose(1, 2)),
        }
        for gemm in (1, 2):
            for c in CONFIGS[gemm]:
                cfg = GemmConfig(*c)
                for flatten in (True, False):
                    name = f"{'flat' if flatten else 'pers'}_{'x'.join(map(str, c))}"
                    if gemm == 1:
                        fn = lambda cfg=cfg, f=flatten: flat_gemm(  # noqa: E731
                            x, w13, counts, cfg, a_rows=src, activation="silu", flatten=f)
                    else:
                        fn = lambda cfg=cfg, f=flatten: flat_gemm(  # noqa: E731
                            h_ref, w2, counts, cfg, flatten=f)
                    variants[(gemm, name)] = fn
        calls, replays = (2, 6) if T >= 4096 else (6, 12)
        for (gemm, name), fn in variants.items():
            row = {"preset": preset, "T": T, "gemm": gemm, "variant": name,
                   "floor_us": floors[gemm]}
            try:
                if name != "bmm":
                    err = rel(fn(), h_ref if gemm == 1 else y_ref)
                    row["rel_err_vs_torch"] = err
                    if not err < 2e-2:
                        raise RuntimeError(f"rel err {err:.3g}")
                if not args.smoke:
                    row["us"] = [graph_time_us([fn], calls, replays) for _ in range(2)]
                    row["x_floor"] = min(row["us"]) / floors[gemm]
            except Exception as exc:  # noqa: BLE001 - a config that fails is a result
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(row, flush=True)
        write_json("probe_flat.json", {"device": torch.cuda.get_device_name(dev),
                                       "copy_gbs": copy_gbs, "mm_tflops": mm_tflops,
                                       "rows": rows})
        if args.smoke:
            break
    print(f"# copy {copy_gbs:.0f} GB/s, matmul {mm_tflops:.0f} TFLOP/s")
    for r in rows:
        if "us" in r:
            print(f"{r['preset']:8s} T={r['T']:6d} gemm{r['gemm']} {r['variant']:28s} "
                  f"{min(r['us']):9.1f} us  {r['x_floor']:.2f}x floor")
        elif "error" in r:
            print(f"{r['preset']:8s} T={r['T']:6d} gemm{r['gemm']} {r['variant']:28s} "
                  f"{r['error']}")


if __name__ == "__main__":
    main()
