"""A warp-specialised grouped GEMM (Triton's automatic warp specialisation on Hopper: one
producer warp group issuing the TMA loads, two consumer warp groups on the tensor cores)
against the library's grouped GEMM and torch's, on the layer's large shapes, one GPU.

The library kernel finds each tile's expert with vector sums over the (e,) counts; Triton's
Hopper warp-specialisation pass does not take reductions or scans in the kernel, so here a
one-program prologue writes a table row per row block (expert, first row, end row) and the
GEMM reads its three ints. Both operands come in through tensor descriptors, so GEMM 1 reads
rows already sorted by expert (`x[src]`, timed with it).

Each variant is checked against torch's path, then all are timed by CUDA-graph replay in turn,
twice. Writes probe_ws.json under $OUT. On triton 3.6 and an H100 (stop 15) every
warp-specialised variant hung, so run them through `--smoke` under `timeout` first
(launch/device_ws.sh); "nows" is the same kernel without it.

    python launch/probe_ws.py [--variants nows skip0 pers] [--tokens 4096 16384 512]
    python launch/probe_ws.py --smoke skip0 --gemm 1
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import graph_time_us, write_json  # noqa: E402
from sweep_gemm import ceilings, gemm_cases, rel  # noqa: E402

from ep_moe.experts import _grouped_mm  # noqa: E402
from ep_moe.kernels.activation import ACTIVATIONS, _act_and_grad, gated_activation  # noqa: E402
from ep_moe.kernels.grouped_gemm import gemm_config, grouped_gemm  # noqa: E402

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


@triton.jit
def _block_table_kernel(counts_ptr, table_ptr, num_experts, num_pid_m,
                        E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """table[b] = (expert, first row, end row) of row block b; expert -1 past the last."""
    e = tl.arange(0, E_POW2)
    counts = tl.maximum(tl.load(counts_ptr + e, mask=e < num_experts, other=0).to(tl.int32), 0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_ends = tl.cumsum(blocks, 0)
    row_ends = tl.cumsum(counts, 0)
    for start in range(0, num_pid_m, CHUNK):
        b = start + tl.arange(0, CHUNK)
        expert = tl.sum((block_ends[None, :] <= b[:, None]).to(tl.int32), 1)
        mine = e[None, :] == expert[:, None]
        row_end = tl.sum(tl.where(mine, row_ends[None, :], 0), 1)
        row_begin = row_end - tl.sum(tl.where(mine, counts[None, :], 0), 1)
        first_block = tl.sum(tl.where(mine, (block_ends - blocks)[None, :], 0), 1)
        first_row = row_begin + (b - first_block) * BLOCK_M
        expert = tl.where(expert < num_experts, expert, -1)
        ok = b < num_pid_m
        tl.store(table_ptr + b * 4, expert, mask=ok)
        tl.store(table_ptr + b * 4 + 1, first_row, mask=ok)
        tl.store(table_ptr + b * 4 + 2, row_end, mask=ok)
    tl.store(table_ptr + num_pid_m * 4, tl.minimum(tl.sum(blocks), num_pid_m))


@triton.jit
def _ws_tile(tile, num_pid_m, a_desc, w_desc, out_ptr, table_ptr, N, K, n_rows_w, num_rows,
             stride_om, HAS_ACT: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             GROUP_M: tl.constexpr, WS: tl.constexpr, SKIP: tl.constexpr):
    """One output tile. SKIP: 0 = a block past the last runs a loop of no trips, 1 = the loop
    sits in an `if`, 2 = every block is real (the caller counts them)."""
    # the library's grouped order (grouped_gemm._gemm_tile), inline there: under the CPU
    # interpreter a nested jit call made each launch ~60% slower
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = tile // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * num_pid_n)) % group_m
    pid_n = (tile % (GROUP_M * num_pid_n)) // group_m
    expert = tl.load(table_ptr + pid_m * 4)
    first_row = tl.load(table_ptr + pid_m * 4 + 1)
    row_end = tl.load(table_ptr + pid_m * 4 + 2)
    if SKIP == 1:
        if expert >= 0:
            _ws_body(expert, first_row, row_end, pid_n, a_desc, w_desc, out_ptr, N, K,
                     n_rows_w, num_rows, stride_om, HAS_ACT, GATED, ACT, BLOCK_M, BLOCK_N,
                     BLOCK_K, WS, K)
    else:
        k_end = tl.where(expert >= 0, K, 0) if SKIP == 0 else K
        _ws_body(expert, first_row, row_end, pid_n, a_desc, w_desc, out_ptr, N, K, n_rows_w,
                 num_rows, stride_om, HAS_ACT, GATED, ACT, BLOCK_M, BLOCK_N, BLOCK_K, WS, k_end)


@triton.jit
def _ws_body(expert, first_row, row_end, pid_n, a_desc, w_desc, out_ptr, N, K, n_rows_w,
             num_rows, stride_om, HAS_ACT: tl.constexpr, GATED: tl.constexpr,
             ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, WS: tl.constexpr, k_end):
    w_first = tl.maximum(expert, 0) * n_rows_w + pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, k_end, BLOCK_K, warp_specialize=WS):
        a = a_desc.load([first_row, k0])
        acc = tl.dot(a, w_desc.load([w_first, k0]).T, acc)
        if GATED:
            acc_up = tl.dot(a, w_desc.load([w_first + N, k0]).T, acc_up)
    if HAS_ACT:
        acc, _ = _act_and_grad(acc, ACT)
        if GATED:
            acc = acc * acc_up
    rows = first_row + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_end = tl.where(expert >= 0, tl.minimum(row_end, num_rows), 0)
    ok = rows < row_end
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=ok[:, None] & (cols[None, :] < N))


@triton.jit
def _ws_gemm_kernel(a_desc, w_desc, out_ptr, table_ptr, N, K, n_rows_w, num_rows, num_pid_m,
                    stride_om, HAS_ACT: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, WS: tl.constexpr, PERSISTENT: tl.constexpr,
                    SKIP: tl.constexpr):
    if PERSISTENT:  # over the real blocks only (their number is the table's last row)
        real_m = tl.load(table_ptr + num_pid_m * 4)
        num_tiles = real_m * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=False):
            _ws_tile(tile, real_m, a_desc, w_desc, out_ptr, table_ptr, N, K, n_rows_w,
                     num_rows, stride_om, HAS_ACT, GATED, ACT, BLOCK_M, BLOCK_N, BLOCK_K,
                     GROUP_M, WS, 2)
    else:
        _ws_tile(tl.program_id(0), num_pid_m, a_desc, w_desc, out_ptr, table_ptr, N, K,
                 n_rows_w, num_rows, stride_om, HAS_ACT, GATED, ACT, BLOCK_M, BLOCK_N, BLOCK_K,
                 GROUP_M, WS, SKIP)


def ws_gemm(a, w, counts, activation=None, cfg=(128, 128, 64, 8, 4, 3), ws=True,
            persistent=False, table=None, skip=0):
    """out (P, N or N/2) = per-expert a @ w[e].T over a's rows sorted by expert (a: (P, K),
    w: (e, N, K) contiguous, 16-bit). `table` reuses a block table of the same counts."""
    bm, bn, bk, gm, nw, ns = cfg
    E, n_total, K = w.shape
    P = a.shape[0]
    gated = activation is not None
    n_out = n_total // 2 if gated else n_total
    out = a.new_empty(P, n_out)
    num_pid_m = triton.cdiv(P, bm) + E
    if table is None:
        table = block_table(counts, num_pid_m, bm)
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w.view(E * n_total, K), [bn, bk])
    tiles = num_pid_m * triton.cdiv(n_out, bn)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4
    grid = (min(tiles, sms) if persistent else tiles,)
    _ws_gemm_kernel[grid](a_desc, w_desc, out, table, n_out, K, n_total, P, num_pid_m,
                          out.stride(0), HAS_ACT=gated, GATED=gated,
                          ACT=ACTIVATIONS[activation or "silu"], BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_K=bk, GROUP_M=gm, WS=ws, PERSISTENT=persistent, SKIP=skip,
                          num_warps=nw, num_stages=ns)
    return out


def block_table(counts, num_pid_m, bm):
    table = torch.empty(num_pid_m + 1, 4, dtype=torch.int32, device=counts.device)
    E = counts.shape[0]
    _block_table_kernel[(1,)](counts, table, E, num_pid_m, E_POW2=triton.next_power_of_2(E),
                              BLOCK_M=bm, CHUNK=64)
    return table


# (block_m, block_n, block_k, group_m, warps, stages); warps 4 with warp specialisation gives
# 12: one producer warp group and the 128 rows split over two consumer warp groups
CONFIGS = {
    1: [(128, 128, 64, 8, 4, 3), (128, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4)],
    2: [(128, 256, 64, 8, 4, 3), (128, 128, 64, 8, 4, 4), (256, 128, 64, 8, 4, 3)],
}


def _warps(cfg, ws):
    """Without warp specialisation, 8 warps (the library's choice for 128-row tiles)."""
    return cfg if ws else cfg[:4] + (8, cfg[5])


SMOKE = {"skip0": dict(ws=True, persistent=False, skip=0),
         "skip1": dict(ws=True, persistent=False, skip=1),
         "pers": dict(ws=True, persistent=True, skip=0),
         "nows": dict(ws=False, persistent=False, skip=0)}


def smoke(variant: str, gemm: int) -> None:
    """One variant on a small case with empty experts and blocks past the last (run it under
    `timeout`: a warp-specialised kernel that deadlocks hangs the process)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    E, D, N = 8, 512, 1024
    counts = torch.tensor([300, 0, 5, 129, 0, 700, 1, 257], device=dev)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    a = torch.randn(int(counts.sum()), D, device=dev, dtype=torch.bfloat16)
    w = torch.randn(E, N, D, device=dev, dtype=torch.bfloat16) * D ** -0.5
    act = "silu" if gemm == 1 else None
    cfg = CONFIGS[gemm][0]
    out = ws_gemm(a, w, counts, act, _warps(cfg, SMOKE[variant]["ws"]), **SMOKE[variant])
    ref = _grouped_mm(a, w.transpose(1, 2), offs=offs)
    if act:
        ref = gated_activation(ref, act)
    torch.cuda.synchronize()
    print(f"smoke {variant} gemm {gemm}: ok, rel err {rel(out, ref):.2e}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", choices=list(SMOKE))
    p.add_argument("--gemm", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["skip0", "pers", "nows"])
    p.add_argument("--presets", nargs="+", default=["mixtral", "qwen3"])
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096, 16384])
    args = p.parse_args()
    if args.smoke:
        return smoke(args.smoke, args.gemm)
    dev = torch.device("cuda")
    copy_gbs, mm_tflops = ceilings(dev)
    rows = []
    cases = gemm_cases(args.presets, args.tokens, dev, copy_gbs, mm_tflops)
    for preset, T, K, w13, w2, case in cases:
        x, src, counts, offs, h_ref, y_ref, floors = case
        E = w13.shape[0]
        P = T * K
        calls, replays = (2, 8)
        for gemm in (1, 2):
            if gemm == 1:
                variants = {
                    "torch": lambda: gated_activation(
                        _grouped_mm(x[src], w13.transpose(1, 2), offs=offs), "silu"),
                    "ours": lambda: grouped_gemm(x, w13, counts, a_rows=src,
                                                 activation="silu")}
                for c in CONFIGS[1]:
                    for v in args.variants:
                        kw = SMOKE[v]
                        variants[f"{v}_" + "_".join(map(str, c))] = (
                            lambda c=c, kw=kw: ws_gemm(x[src], w13, counts, "silu",
                                                       _warps(c, kw["ws"]), **kw))
                ref = h_ref
            else:
                variants = {
                    "torch": lambda: _grouped_mm(h_ref, w2.transpose(1, 2), offs=offs),
                    "ours": lambda: grouped_gemm(h_ref, w2, counts)}
                for c in CONFIGS[2]:
                    for v in args.variants:
                        kw = SMOKE[v]
                        variants[f"{v}_" + "_".join(map(str, c))] = (
                            lambda c=c, kw=kw: ws_gemm(h_ref, w2, counts, None,
                                                       _warps(c, kw["ws"]), **kw))
                ref = y_ref
            row = {"preset": preset, "T": T, "gemm": gemm, "floor_us": floors[gemm],
                   "ours_default": list(gemm_config(P / E, gemm == 1, num_experts=E))}
            for name, f in list(variants.items()):
                try:
                    out = f()
                    err = rel(out, ref)
                    row[f"{name}_err"] = err
                    print(f"  checked {preset} T={T} gemm {gemm} {name}: {err:.2e}",
                          flush=True)
                    if not err < 2e-2:
                        raise RuntimeError(f"rel err {err:.3g} vs torch")
                except Exception as exc:  # a config that does not compile or fit: go on
                    row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    print(name, row[f"{name}_error"], flush=True)
                    del variants[name]
            torch.cuda.synchronize()
            for rnd in range(2):
                for name, f in variants.items():
                    row.setdefault(f"{name}_us", []).append(
                        graph_time_us([f], calls, replays))
                    print(f"  {preset} T={T} gemm {gemm} {name}: "
                          f"{row[f'{name}_us'][-1]:.0f} us", flush=True)
            for name in variants:
                row[f"{name}_vs_floor"] = min(row[f"{name}_us"]) / floors[gemm]
            rows.append(row)
            best = min(variants, key=lambda n: min(row[f"{n}_us"]))
            print(f"{preset} T={T} gemm {gemm}: floor {floors[gemm]:.0f} us; " + ", ".join(
                f"{n} {'/'.join(f'{u:.0f}' for u in row[f'{n}_us'])}" for n in variants)
                + f"; best {best}", flush=True)
    write_json("probe_ws.json", {"device": torch.cuda.get_device_name(dev),
                                 "copy_ceiling_gbs": copy_gbs,
                                 "matmul_ceiling_tflops": mm_tflops, "rows": rows})
    table = [{"preset": r["preset"], "T": r["T"], "gemm": r["gemm"],
              "floor": round(r["floor_us"]),
              **{k[:-3]: round(min(r[k])) for k in r if k.endswith("_us") and k != "floor_us"}}
             for r in rows]
    for t in table:
        print(t)


if __name__ == "__main__":
    main()
