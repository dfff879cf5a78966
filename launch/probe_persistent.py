"""The grouped GEMM over a buffer sized by a bound: a grid sized by the bound against the
persistent launch, and the new kernel against the previous one on exact buffers (no
regression), on one GPU. CUDA-graph replays; writes probe_persistent.json under $OUT.

    python launch/probe_persistent.py [OLD_MODULE]

OLD_MODULE (optional): a module path holding the previous `grouped_gemm`, for the A/B.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import graph_time_us, write_json  # noqa: E402

from ep_moe.kernels.grouped_gemm import grouped_gemm  # noqa: E402


def case(e, D, I, pairs, bound, device, seed=0):
    """Rows sorted by expert: `pairs` real ones spread evenly at random over e experts, in a
    buffer of `bound` rows (the rest padding, as behind a fixed-size exchange)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    expert = torch.randint(0, e, (pairs,), generator=g).sort().values
    counts = torch.bincount(expert, minlength=e).to(device)
    R = bound // 4 + 1
    x = torch.randn(R, D, device=device, dtype=torch.bfloat16)
    a_rows = torch.randint(0, R, (bound,), generator=g).to(device)
    w1 = torch.randn(e, 2 * I, D, device=device, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(e, D, I, device=device, dtype=torch.bfloat16) * 0.02
    return x, a_rows, counts, w1, w2


def both(gemm, x, a_rows, counts, w1, w2, rows_per_expert, **kw):
    mod = sys.modules[gemm.__module__]  # the config class of the kernel's own module
    budget = mod.shared_budget(x.device)
    cfgs = [mod.gemm_config(rows_per_expert, g, 2, budget) for g in (True, False)]
    h = gemm(x, w1, counts, a_rows=a_rows, activation="silu", config=cfgs[0], **kw)
    return gemm(h, w2, counts, config=cfgs[1], **kw)


def main():
    device = torch.device("cuda")
    old = importlib.import_module(sys.argv[1]).grouped_gemm if len(sys.argv) > 1 else None
    res = {"device": torch.cuda.get_device_name(), "rows": []}
    D, I = 2048, 768
    # (e, real pairs, buffer rows): Qwen3 at W = 4, 8192 tokens per GPU (one chunk; the 3
    # tapered chunks' edge and middle), decode (64 tokens), and the single GPU (exact)
    shapes = [("W4 one chunk", 32, 65536, 4 * 65536), ("W4 edge chunk", 32, 16384, 4 * 16384),
              ("W4 middle chunk", 32, 32768, 4 * 32768), ("W4 decode", 32, 512, 4 * 512),
              ("single GPU exact", 128, 65536, 65536), ("W4 one chunk exact", 32, 65536, 65536)]
    for name, e, pairs, bound in shapes:
        args = case(e, D, I, pairs, bound, device)
        rpe = pairs / e
        ref = both(grouped_gemm, *args, rpe)
        row = {"name": name, "e": e, "pairs": pairs, "bound": bound}
        variants = {"grid": dict(persistent=False), "persistent": dict(persistent=True)}
        for vname, kw in variants.items():
            out = both(grouped_gemm, *args, rpe, **kw)
            row[f"{vname}_same"] = bool(torch.equal(out[:pairs], ref[:pairs]))
            row[f"{vname}_us"] = graph_time_us([lambda kw=kw: both(grouped_gemm, *args, rpe,
                                                                   **kw)], 10, 20)
        if old is not None:
            row["old_same"] = bool(torch.equal(both(old, *args, rpe)[:pairs], ref[:pairs]))
            row["old_us"] = graph_time_us([lambda: both(old, *args, rpe)], 10, 20)
            row["grid_again_us"] = graph_time_us([lambda: both(grouped_gemm, *args, rpe)],
                                                 10, 20)
        res["rows"].append(row)
        print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()},
              flush=True)
    write_json("probe_persistent.json", res)


if __name__ == "__main__":
    main()
