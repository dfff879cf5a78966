"""Sweep the forward combine's kernel variants and configs over PERF.md's shapes.

    python launch/sweep_combine.py                # one GPU, ~2-3 min; picks `_fwd_config`
    TRITON_INTERPRET=1 python launch/sweep_combine.py --cpu-smoke  # tiny shapes: checks only

Variants: "token" (`FwdConfig`, the current heuristic's) and "pipelined" (`PipelinedFwdConfig`).
Every config is checked against the torch path first (NaN in every skipped slot, NaN-poisoned
output), then timed by CUDA-graph replay over 4 rotating input sets (so the inputs do not sit
in L2). Rows: bf16 at W = 1, 2, 4 (100%, 50%, 25% of slots local; W = 1 has no ids or map),
one fp32 shape, and the gathered layout the layer uses (row index, no map) at W = 1 and 4.
Prints each row's best config per variant, then per (K, D) the config nearest each row's best
over the rows that take `_fwd_config`'s has_map branch (W > 1, gathered): the one to paste
there. JSON to $OUT_DIR if set, else $OUT or ./out (launch/common.py).
Notation: T tokens, K top-k, D hidden size, E global experts, W expert-parallel ranks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_ceiling_gbs, graph_time_us, write_json  # noqa: E402

import ep_moe.kernels.fused_mul_sum as fms  # noqa: E402

E = 64  # global experts; rank 0 of W owns the contiguous block [0, E // W)
N_SETS = 4  # rotating input sets per row (GPU)

# token variant: the winners of the last sweep (launch/results/h200/sweep_combine.json)
TOKEN = [fms.FwdConfig(2048, 4, 0), fms.FwdConfig(1024, 2, 0), fms.FwdConfig(2048, 4, 32),
         fms.FwdConfig(2048, 8, 32), fms.FwdConfig(1024, 4, 8)]
# pipelined variant: (slots, block_d, num_warps, programs_per_sm). Its programs are
# persistent: programs_per_sm should be as many as fit on an SM at once (a program left for
# a second wave makes a tail; fewer leave bytes out of flight). Register counts below are from
# an offline sm_90 compile (triton 3.9, bf16, K = 8); fp32 takes about twice as many, hence
# the half-size rows. `_fwd_config` does not see the dtype: one config serves both.
PIPELINED = [fms.PipelinedFwdConfig(*c) for c in [
    (4, 1024, 4, 7),   # ~70 registers: 7 programs of 4 warps fit
    (4, 1024, 4, 4),   # fp32: ~118
    (4, 2048, 4, 4),   # ~128: two 16-byte vectors a row per thread, fewer warps per token
    (4, 2048, 4, 2),   # fp32: ~196
    (4, 2048, 2, 4),   # ~203: four vectors a row per thread, half the per-token overhead
    (4, 2048, 8, 2),   # ~94: one program covers a D = 2048 row
    (8, 1024, 4, 4),   # ~105: every K = 8 slot in one round (no second one at 50% local)
    (2, 2048, 4, 5),   # ~93: two slots a round, more rounds
    (4, 4096, 8, 2),   # ~128 at D >= 4096: fewer column blocks
]]
CONFIGS = TOKEN + PIPELINED


def gpu_rows():
    """(T, K, D, W, dtype, layout); PERF.md's shapes."""
    bf16, fp32 = torch.bfloat16, torch.float32
    rows = [(T, K, D, W, bf16, "dense")
            for T, K, D in [(4096, 2, 4096), (16384, 2, 4096), (4096, 8, 2048),
                            (16384, 8, 2048), (8192, 8, 7168)] for W in (1, 2, 4)]
    rows += [(16384, 8, 2048, W, fp32, "dense") for W in (1, 2, 4)]
    rows += [(16384, 8, 2048, W, bf16, "gathered") for W in (1, 4)]
    return rows


def smoke_rows():
    return [(33, 8, 40, W, torch.bfloat16, "dense") for W in (1, 2, 4)] + \
        [(9, 2, 37, 4, torch.float32, "dense"), (21, 8, 40, 4, torch.bfloat16, "gathered")]


def compile_key(cfg, K, D):
    """What a config compiles to at (K, D), roughly: programs_per_sm is a launch parameter."""
    block_k = triton.next_power_of_2(K)
    if isinstance(cfg, fms.PipelinedFwdConfig):
        return ("pipelined", K, min(cfg.slots, block_k),
                min(cfg.block_d, triton.next_power_of_2(D)), cfg.num_warps)
    return ("token", K, cfg.block_d, cfg.num_warps, cfg.programs_per_sm > 0)


def make_set(T, K, D, W, dtype, layout, dev, gen):
    """(inputs, weights, ids, map, row_index), keep (T, K): ids uniform without replacement
    per token, so about K / W slots local. Gathered: one row per local slot (random order, as
    after the sort by expert) and the layer's call (row index only)."""
    w = torch.rand(T, K, device=dev, generator=gen) + 0.1
    ids = torch.rand(T, E, device=dev, generator=gen).argsort(1)[:, :K].to(torch.int32)
    keep = ids < E // W
    if layout == "gathered":
        n = int(keep.sum())
        rows = torch.full((T, K), -1, dtype=torch.int32, device=dev)
        rows[keep] = torch.randperm(n, device=dev, generator=gen).to(torch.int32)
        x = torch.randn(n + 1, D, device=dev, dtype=dtype, generator=gen)  # last: unreferenced
        return (x, w, None, None, rows), keep
    x = torch.randn(T, K, D, device=dev, dtype=dtype, generator=gen)
    if W == 1:
        return (x, w, None, None, None), keep
    emap = torch.full((E,), -1, dtype=torch.int32, device=dev)
    emap[:E // W] = torch.arange(E // W, dtype=torch.int32, device=dev)
    return (x, w, ids, emap, None), keep


def bytes_moved(args, keep, D):
    """Rows of the counting slots, the output once, the routing read."""
    x, w, ids, emap, rows = args
    el = x.element_size()
    moved = int(keep.sum()) * D * el + w.shape[0] * D * el + w.numel() * w.element_size()
    for t in (ids, emap, rows):
        moved += 0 if t is None else t.numel() * t.element_size()
    return moved


HEURISTIC = fms._fwd_config


def run(cfg, args, out):
    """One forward with `cfg` pinned (None: the heuristic)."""
    fms._fwd_config = HEURISTIC if cfg is None else (lambda K, D, has_map: cfg)
    try:
        fms._fwd_triton(*args, out)
    finally:
        fms._fwd_config = HEURISTIC


def check(cfg, args, ref, name, dtype):
    """Against the torch path (fp32 sums too, in another order): one ulp of the stored dtype
    (bf16 keeps 8 bits) plus a little for sums that cancel to near zero."""
    out = torch.full_like(ref, float("nan"))
    run(cfg, args, out)
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (2.0**-7, 1e-3)
    bad = ~((out.float() - ref.float()).abs() <= rtol * ref.float().abs() + atol)  # NaN: bad
    if bad.any():
        raise SystemExit(f"{cfg or 'heuristic'} wrong on {name}: {int(bad.sum())} elements "
                         f"off, first at {bad.nonzero()[0].tolist()}")


def time_us(cfg, sets, outs, smoke):
    calls = [lambda a=a, o=o: run(cfg, a, o) for (a, _), o in zip(sets, outs)]
    if not smoke:
        return graph_time_us(calls)
    t0 = time.perf_counter()  # interpreter: wall clock of one call, the numbers mean nothing
    calls[0]()
    return (time.perf_counter() - t0) * 1e6


def has_map(row):
    """The row takes `_fwd_config`'s has_map branch (slots can be skipped)."""
    return row["W"] > 1 or row["layout"] == "gathered"


def pick_per_shape(results, branch):
    """Per (K, D, dtype) over the rows of a branch: the config with the smallest geometric
    mean of (its time / the row's best time)."""
    groups = {}
    for r in (r for r in results if has_map(r) == branch):
        groups.setdefault((r["K"], r["D"], r["dtype"]), []).append(r)
    picks = {}
    for key, rows in groups.items():
        def score(name):
            return math.exp(sum(math.log(r["configs"][name]["us"] /
                                         min(c["us"] for c in r["configs"].values()))
                                for r in rows) / len(rows))
        name = min(rows[0]["configs"], key=score)
        picks[key] = (name, score(name), [r["configs"][name]["pct"] for r in rows])
    return picks


def save(payload) -> str:
    """$OUT_DIR if set, else where launch/common.py writes ($OUT or ./out)."""
    if "OUT_DIR" not in os.environ:
        return write_json("sweep_combine.json", payload)
    os.makedirs(os.environ["OUT_DIR"], exist_ok=True)
    path = os.path.join(os.environ["OUT_DIR"], "sweep_combine.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1: checks only")
    smoke = parser.parse_args(argv).cpu_smoke
    if smoke and not fms._INTERPRET:
        parser.error("--cpu-smoke needs TRITON_INTERPRET=1")
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: use --cpu-smoke")
    dev = torch.device("cpu" if smoke else "cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = smoke_rows() if smoke else gpu_rows()
    kernels = {compile_key(c, K, D) + (dt, W > 1, lay)
               for c in CONFIGS for _, K, D, W, dt, lay in rows}
    print(f"{len(rows)} rows x {len(CONFIGS) + 1} configs (incl. the heuristic) = "
          f"{len(rows) * (len(CONFIGS) + 1)} checks and timings; about {len(kernels)} kernels "
          f"to compile", flush=True)
    t_start = time.perf_counter()
    ceiling = 1.0 if smoke else copy_ceiling_gbs(dev)
    results = []
    for T, K, D, W, dtype, layout in rows:
        name = f"T={T} K={K} D={D} W={W} {str(dtype).removeprefix('torch.')} {layout}"
        sets = [make_set(T, K, D, W, dtype, layout, dev, gen)
                for _ in range(1 if smoke else N_SETS)]
        (x, *rest), keep = sets[0]  # the checked set: NaN wherever nothing may be read
        x = x.masked_fill(~keep[..., None], float("nan")) if layout == "dense" else \
            torch.cat([x[:-1], torch.full_like(x[-1:], float("nan"))])
        sets[0] = ((x, *rest), keep)
        ref = torch.empty(T, D, device=dev, dtype=dtype)
        fms._fwd_torch(*sets[0][0], ref)
        outs = [torch.empty_like(ref) for _ in sets]
        moved = bytes_moved(sets[0][0], keep, D)
        row = {"T": T, "K": K, "D": D, "W": W, "dtype": str(dtype).removeprefix("torch."),
               "layout": layout, "bytes": moved, "configs": {}}
        for cfg in CONFIGS + [None]:
            check(cfg, sets[0][0], ref, name, dtype)
            us = time_us(cfg, sets, outs, smoke)
            row["configs"][repr(cfg) if cfg else "heuristic"] = {
                "variant": "heuristic" if cfg is None else
                "pipelined" if isinstance(cfg, fms.PipelinedFwdConfig) else "token",
                "us": us, "pct": 100 * moved / us / 1e3 / ceiling}
        row["best"] = min(row["configs"], key=lambda c: row["configs"][c]["us"])
        results.append(row)
        best = {}
        for cname, c in row["configs"].items():
            if c["variant"] not in best or c["us"] < best[c["variant"]][1]["us"]:
                best[c["variant"]] = (cname, c)
        print(f"{name} ({moved / 1e6:.1f} MB): " + " | ".join(
            f"{v} {c['us']:.1f}us {c['pct']:.0f}% {cname if v != 'heuristic' else ''}"
            for v, (cname, c) in best.items()), flush=True)
        del sets, outs
    for branch in (True, False):
        print(f"\n_fwd_config, has_map={branch}: per (K, D, dtype) the config nearest each "
              "row's best (geometric mean of time / best), % of the copy ceiling on its rows")
        for (K, D, dt), (cname, score, pcts) in pick_per_shape(results, branch).items():
            print(f"  K={K} D={D} {dt}: {cname}  x{score:.3f}  "
                  f"[{', '.join(f'{p:.0f}%' for p in pcts)}]")
    path = save({"copy_ceiling_gbs": ceiling, "device": "cpu (interpreter)" if smoke else
                 torch.cuda.get_device_name(), "torch": torch.__version__,
                 "triton": triton.__version__, "wall_s": time.perf_counter() - t_start,
                 "rows": results})
    print(f"\n{time.perf_counter() - t_start:.0f} s; JSON: {path}")


if __name__ == "__main__":
    main()
