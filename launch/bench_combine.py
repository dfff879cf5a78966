"""Benchmark the fused top-k combine against the copy ceiling, eager torch and PERF.md's anchors.

    python launch/bench_combine.py              # on one GPU; JSON to $OUT/bench_combine.json
    python launch/bench_combine.py --cpu-smoke  # tiny shapes on the CPU: correctness path only

Each row: fresh random inputs, a correctness check of ours and of eager against a float64
reference (outputs poisoned with NaN, NaN in every skipped slot of ours), then ours and eager
timed twice each by CUDA-graph replay (10 calls a graph, median per call). Rows with T > 256
rotate over 4 copies of their inputs inside the graph so the inputs never sit in L2; rows with
T <= 256 are launch-bound and replay on the same (L2-warm) data. `ours_call_us` adds one
`do_bench` time per large row: a call from Python, launch overhead included. Beside each row,
torch's `copy_` of the same bytes (read + write) under the same timer, at the exact length and
rounded up to whole 64 KiB (the copy's speed hangs on the length); "copy / ours" takes the
faster of the two.

"Bytes that must move": the rows of the slots that count, the output once, weights, ids, map.
Notation: T tokens, K top-k, D hidden size, E global experts, W expert-parallel ranks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch
import triton

from ep_moe.kernels import moe_fused_mul_sum

E = 64  # global experts; rank 0 of W owns the contiguous block [0, E // W)
GRAPH_CALLS = 10  # calls captured per CUDA graph for launch-bound rows

# PERF.md anchors, measured on an H200 (reference kernel and eager torch, us; % of copy ceiling
# for the reference kernel), keyed by (T, K, D, W), bf16 inputs, fp32 weights.
ANCHORS_H200 = {
    (4096, 2, 4096, 1): dict(ref_us=29.8, eager_us=301, ref_pct=80),
    (16384, 2, 4096, 1): dict(ref_us=98.8, eager_us=1150, ref_pct=96),
    (16384, 2, 4096, 4): dict(ref_us=74.5, eager_us=1166, ref_pct=64),
    (4096, 8, 2048, 4): dict(ref_us=48.6, eager_us=506, ref_pct=24),
    (16384, 8, 2048, 1): dict(ref_us=146, eager_us=1896, ref_pct=97),
    (16384, 8, 2048, 4): dict(ref_us=64.5, eager_us=1914, ref_pct=74),
    (8192, 8, 7168, 4): dict(ref_us=105, eager_us=3278, ref_pct=79),
}
# Same kernel on an H100, % of copy ceiling with the expert map at 4 ranks (78-99% without).
ANCHORS_H100_PCT = {(4096, 2, 4096, 4): 68, (16384, 2, 4096, 4): 83, (4096, 8, 2048, 4): 64,
                    (16384, 8, 2048, 4): 84, (8192, 8, 7168, 4): 88}
# H100, CUDA-graph replay: reference kernel 1.4-2.8 us for T <= 64, 5.9 us at (256, 8, 7168)
# (EP ranks not stated); one trivial kernel launch 1.3-1.8 us.
ANCHORS_H100_SMALL_US = {(256, 8, 7168): 5.9}
ANCHOR_H100_SMALL_RANGE_US = (1.4, 2.8)


def gpu_rows():
    """(T, K, D, W, dtype) rows; W=1 runs without ids or map, every slot counts."""
    bf16, fp32 = torch.bfloat16, torch.float32
    rows = []
    for T, K, D in [(4096, 2, 4096), (16384, 2, 4096), (4096, 8, 2048), (16384, 8, 2048),
                    (8192, 8, 7168)]:
        rows += [(T, K, D, 1, bf16), (T, K, D, 4, bf16)]  # PERF.md's table, both rank counts
    rows += [(16384, 2, 4096, 2, bf16), (16384, 8, 2048, 2, bf16),  # 50% local
             (8192, 8, 7168, 2, bf16)]
    rows += [(16384, 2, 4096, 1, fp32), (16384, 2, 4096, 4, fp32),  # fp32 inputs
             (16384, 8, 2048, 4, fp32)]
    rows += [(T, 8, 7168, 4, bf16) for T in (1, 16, 64, 256)]  # launch-bound
    rows += [(1, 8, 7168, 1, bf16), (256, 8, 7168, 1, bf16)]
    return rows


def smoke_rows():
    return [(3, 2, 37, 1, torch.bfloat16), (5, 8, 129, 4, torch.bfloat16),
            (7, 3, 64, 2, torch.float32), (1, 8, 40, 4, torch.bfloat16)]


# --------------------------------------------------------------------------------------------
# Inputs, reference, eager baseline
# --------------------------------------------------------------------------------------------

def make_row(T, K, D, W, dtype, device, gen):
    """Random inputs; ids drawn uniformly without replacement per token, so ~K/W slots local."""
    x = torch.randn(T, K, D, device=device, dtype=dtype, generator=gen)
    w = torch.rand(T, K, device=device, generator=gen) + 0.1  # fp32 weights
    if W == 1:
        return x, w, None, None, torch.ones(T, K, dtype=torch.bool, device=device)
    ids = torch.rand(T, E, device=device, generator=gen).argsort(dim=1)[:, :K].to(torch.int32)
    n_local = E // W
    emap = torch.full((E,), -1, dtype=torch.int32, device=device)
    emap[:n_local] = torch.arange(n_local, dtype=torch.int32, device=device)
    keep = ids < n_local  # rank 0 owns experts [0, E // W): obviously right, no map lookup
    return x, w, ids, emap, keep


def reference(x, w, keep):
    """float64 combine and the sum of |terms| (bounds the fp32 accumulation error)."""
    T, K, D = x.shape
    out = torch.zeros(T, D, dtype=torch.float64, device=x.device)
    mag = torch.zeros_like(out)
    for k in range(K):  # one slot at a time: never a (T, K, D) float64 buffer
        term = torch.where(keep[:, k, None], x[:, k].double(), 0.0) * w[:, k, None].double()
        out += term
        mag += term.abs()
    return out, mag


def eager_combine(x, w, ids, emap, out):
    """Plain torch as model code writes it: skipped slots weigh zero (their rows must be finite)."""
    if emap is not None:
        e = emap.shape[0]
        local = (ids >= 0) & (ids < e) & (emap[ids.long().clamp(0, e - 1)] >= 0)
        w = w * local
    # fp32 accumulation: bf16 loses accuracy when summing top-k=8
    out.copy_((x.float() * w.float()[..., None]).sum(1))
    return out


def check(name, got, ref, mag, dtype):
    rtol = {torch.float32: 1e-5, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    rtol = 2.0**-7 if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" \
        else rtol  # the Triton interpreter truncates fp32 -> bf16: a full ulp
    err = (got.double() - ref).abs()
    bad = ~(err <= rtol * ref.abs() + 1e-5 * mag)  # NaN counts as bad
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        sys.stderr.write(f"\n*** MISMATCH in {name}: {int(bad.sum())}/{bad.numel()} elements, "
                         f"first at {idx}: got {got[tuple(idx)].item()!r}, "
                         f"want {ref[tuple(idx)].item()!r}\n")
        raise SystemExit(1)


# --------------------------------------------------------------------------------------------
# Timers
# --------------------------------------------------------------------------------------------

def bench_us(fn, device):
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    fn()  # CPU smoke: a few wall-clock calls, the numbers mean nothing
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def graph_us(fn, device, replays=200):
    """Median per call of a CUDA graph holding GRAPH_CALLS calls (L2 stays warm)."""
    if device.type != "cuda":
        return bench_us(fn, device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    for _ in range(20):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    per_call_ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / GRAPH_CALLS
    del graph
    return per_call_ms * 1e3


def copy_ceiling_gbs(device):
    """Device-to-device copy, bytes read + written, median of do_bench."""
    n = (1 << 30) if device.type == "cuda" else (1 << 22)  # bytes per buffer
    src = torch.randn(n // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), device)
    return 2 * n / (us * 1e-6) / 1e9


# --------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------

def run_row(T, K, D, W, dtype, device, ceiling_gbs, gen):
    launch_bound = T <= 256
    x, w, ids, emap, keep = make_row(T, K, D, W, dtype, device, gen)
    name = f"(T={T}, K={K}, D={D}, W={W}, {str(dtype).removeprefix('torch.')})"

    # correctness, before any timing: NaN-poisoned outputs, NaN in every skipped slot of ours
    ref, mag = reference(x, w, keep)
    x_poisoned = x.masked_fill(~keep[..., None], float("nan"))
    out = torch.full((T, D), float("nan"), device=device, dtype=dtype)
    with torch.no_grad():
        result = moe_fused_mul_sum(x_poisoned, w, out, ids, emap)
    if result is not out:
        sys.stderr.write(f"\n*** {name}: moe_fused_mul_sum did not return `outputs`\n")
        raise SystemExit(1)
    check(f"ours {name}", out, ref, mag, dtype)
    out.fill_(float("nan"))
    check(f"eager {name}", eager_combine(x, w, ids, emap, out), ref, mag, dtype)
    del x_poisoned, ref, mag

    # large rows rotate over 4 copies of the inputs inside the graph, so they are not L2-warm
    sets = [(x, ids)] if launch_bound or device.type != "cuda" else \
        [(x, ids)] + [(x.clone(), None if ids is None else ids.clone()) for _ in range(3)]
    turn = itertools.cycle(range(len(sets)))

    def ours():
        xi, ii = sets[next(turn)]
        moe_fused_mul_sum(xi, w, out, ii, emap)

    def eager():
        xi, ii = sets[next(turn)]
        eager_combine(xi, w, ii, emap, out)

    with torch.no_grad():
        ours_us = [graph_us(ours, device), graph_us(ours, device)]
        eager_us = [graph_us(eager, device), graph_us(eager, device)]
        # one eager call from Python, launch overhead included (how do_bench sees it)
        ours_call_us = bench_us(ours, device) if not launch_bound else None
    del sets

    n_local = int(keep.sum())  # host sync, outside any timing
    el = x.element_size()
    moved = n_local * D * el + T * D * el + w.numel() * w.element_size()
    if ids is not None:
        moved += ids.numel() * ids.element_size() + emap.numel() * emap.element_size()
    best = min(ours_us)  # derived figures use the faster of the two runs of each variant
    gbs = moved / (best * 1e-6) / 1e9
    # torch's copy_ reading and writing the same bytes, timed the same way: what a plain copy
    # gets at this size (ramp-up and tail included), beside the large-copy ceiling the target
    # is set against. Not an exact yardstick: ours writes one output buffer and reads about
    # twice what it writes; a copy rotates both buffers and reads what it writes
    copy_us = same_bytes_copy_us(moved, device, launch_bound)
    # the same, each buffer rounded up to whole 64 KiB (a copy's speed may hang on it)
    copy_aligned_us = same_bytes_copy_us(moved, device, launch_bound, align=1 << 15)
    anchor = ANCHORS_H200.get((T, K, D, W), {})
    small_anchor = ANCHORS_H100_SMALL_US.get((T, K, D))
    row = dict(T=T, K=K, D=D, W=W, dtype=str(dtype).removeprefix("torch."),
               timing=("cpu_wall" if device.type != "cuda" else
                       "cuda_graph" if launch_bound else "cuda_graph_rotating"),
               local_slots=n_local, local_share=n_local / max(T * K, 1), bytes_moved=moved,
               ours_us=ours_us, eager_us=eager_us, ours_call_us=ours_call_us, gbs=gbs,
               pct_of_copy_ceiling=100 * gbs / ceiling_gbs,
               same_bytes_copy_us=copy_us, same_bytes_copy_aligned_us=copy_aligned_us,
               # against the faster copy of the two (the rounded one, on an H100)
               pct_of_same_bytes_copy=None if copy_us is None else
               100 * min(copy_us + copy_aligned_us) / best,
               speedup_vs_eager=min(eager_us) / best)
    if anchor and dtype == torch.bfloat16:
        row.update(anchor_card="H200", anchor_ref_us=anchor["ref_us"],
                   anchor_eager_us=anchor["eager_us"], anchor_ref_pct=anchor["ref_pct"],
                   ours_over_anchor=best / anchor["ref_us"])
    if dtype == torch.bfloat16 and (T, K, D, W) in ANCHORS_H100_PCT:
        row["anchor_h100_ref_pct"] = ANCHORS_H100_PCT[(T, K, D, W)]
    if small_anchor is not None and dtype == torch.bfloat16:
        row.update(anchor_card="H100", anchor_ref_us=small_anchor,
                   ours_over_anchor=best / small_anchor)
    elif launch_bound and T <= 64 and dtype == torch.bfloat16:
        row.update(anchor_card="H100", anchor_ref_us_range=list(ANCHOR_H100_SMALL_RANGE_US))
    return row


def same_bytes_copy_us(moved, device, launch_bound, align=1):
    """`dst.copy_(src)` of moved / 2 bytes (so moved bytes are read + written), two graph
    timings, rotating over 4 buffer pairs for the large rows (one for launch-bound rows);
    None off CUDA. align: round the elements of a buffer up to a multiple of it (on the
    launch-bound rows that copies more than the row's bytes)."""
    if device.type != "cuda":
        return None
    n = max(-(-(moved // 4) // align) * align, 1)  # bf16 elements a buffer
    pairs = [(torch.randn(n, device=device, dtype=torch.bfloat16),
              torch.empty(n, device=device, dtype=torch.bfloat16))
             for _ in range(1 if launch_bound else 4)]
    turn = itertools.cycle(pairs)

    def copy():
        src, dst = next(turn)
        dst.copy_(src)

    times = [graph_us(copy, device), graph_us(copy, device)]
    del pairs
    return times


def launch_floor_us(device):
    """One trivial kernel launch under the same CUDA-graph timer (PERF.md: 1.3-1.8 us, H100)."""
    tiny = torch.empty(16, device=device)
    return graph_us(lambda: tiny.zero_(), device)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def copy_cell(r):
    if r["same_bytes_copy_us"] is None:
        return "|"
    lo, hi = sorted(r["same_bytes_copy_us"])
    aligned = min(r["same_bytes_copy_aligned_us"])
    return f"{lo:.1f} / {hi:.1f} ({aligned:.1f}) | {r['pct_of_same_bytes_copy']:.0f}%"


def markdown(rows, ceiling, floor, device_name):
    lines = [f"copy ceiling {ceiling:.0f} GB/s, one trivial launch {floor:.2f} us ({device_name})",
             "",
             "| T, K, D | W (local) | dtype | timer | ours us (x2) | GB/s | % ceiling "
             "| same-bytes copy us, exact x2 (64 KiB-rounded) | copy / ours | eager us (x2) | vs eager | anchor ref kernel "
             "| ours/anchor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "anchor_ref_us" in r:
            anchor = f"{r['anchor_ref_us']} us {r['anchor_card']}"
            if "anchor_ref_pct" in r:
                anchor += f" ({r['anchor_ref_pct']}%)"
            ratio = f"{r['ours_over_anchor']:.2f}"
        elif "anchor_ref_us_range" in r:
            lo, hi = r["anchor_ref_us_range"]
            anchor, ratio = f"{lo}-{hi} us {r['anchor_card']}", ""
        else:
            anchor, ratio = "", ""
        if "anchor_h100_ref_pct" in r:
            anchor += f" [H100 {r['anchor_h100_ref_pct']}%]"
        lines.append(
            f"| {r['T']}, {r['K']}, {r['D']} | {r['W']} ({100 * r['local_share']:.0f}%) "
            f"| {r['dtype']} | {r['timing']} "
            f"| {r['ours_us'][0]:.1f} / {r['ours_us'][1]:.1f} | {r['gbs']:.0f} "
            f"| {r['pct_of_copy_ceiling']:.0f}% "
            f"| {copy_cell(r)} "
            f"| {r['eager_us'][0]:.1f} / {r['eager_us'][1]:.1f} | {r['speedup_vs_eager']:.1f}x "
            f"| {anchor} | {ratio} |")
    lines.append("")
    lines.append("anchors come from PERF.md (card noted); ours/anchor is informational "
                 "when the card differs. Derived figures use the faster of the two runs.")
    lines.append("cuda_graph rows replay on the same data, L2-warm: their % of the copy ceiling "
                 "can pass 100% and says little; compare their us with the launch floor.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, metavar="T,K,D,W",
                        help="run just these rows (bf16), e.g. 8192,8,7168,4")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU: exercises the correctness path only")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device: use --cpu-smoke")
    out_dir = os.environ.get("OUT", "./out")
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"

    t0 = time.perf_counter()
    ceiling = copy_ceiling_gbs(device)
    floor = launch_floor_us(device)
    rows = []
    shapes = smoke_rows() if args.cpu_smoke else gpu_rows()
    if args.only is not None:
        wanted = {tuple(int(v) for v in r.split(",")) for r in args.only}
        shapes = [r for r in shapes if r[:4] in wanted and r[4] == torch.bfloat16]
    for T, K, D, W, dtype in shapes:
        rows.append(run_row(T, K, D, W, dtype, device, ceiling, gen))
        print(f"checked and timed (T={T}, K={K}, D={D}, W={W}, {dtype}): "
              f"{min(rows[-1]['ours_us']):.1f} us", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = dict(device=device_name, torch=torch.__version__, triton=triton.__version__,
                  copy_ceiling_gbs=ceiling, launch_floor_us=floor, graph_calls=GRAPH_CALLS,
                  num_experts=E, wall_s=time.perf_counter() - t0, rows=rows)
    with open(os.path.join(out_dir, "bench_combine.json"), "w") as f:
        json.dump(result, f, indent=1)
    print()
    print(markdown(rows, ceiling, floor, device_name))


if __name__ == "__main__":
    main()
