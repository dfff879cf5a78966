"""Host time of a grouped GEMM launch, descriptor (TMA) loads against pointer loads, and the
eager Qwen3 forward with each, on one GPU. The host time is the wall time of a burst of
launches on small shapes (the GPU keeps up, so the host is the bound), median of rounds.
A cProfile of the descriptor launches shows where that time goes. Writes probe_host.json.

    python launch/probe_host.py
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_ms, write_json  # noqa: E402

from ep_moe import MoE, MoEConfig  # noqa: E402
from ep_moe.kernels import grouped_gemm as gg  # noqa: E402


def host_us(fn, calls=200, rounds=7):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def main():
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "rows": []}
    e, D, I = 8, 256, 128
    x = torch.randn(64, D, device=dev, dtype=torch.bfloat16)
    w13 = torch.randn(e, 2 * I, D, device=dev, dtype=torch.bfloat16)
    counts = torch.full((e,), 16, device=dev)
    rows = torch.randint(0, 64, (128,), device=dev)
    for tma in (False, True, False, True):
        us = host_us(lambda: gg.grouped_gemm(x, w13, counts, a_rows=rows, activation="silu",
                                             tma=tma))
        res["rows"].append({"what": "grouped_gemm launch", "tma": tma, "host_us": us})
        print(res["rows"][-1], flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        gg.grouped_gemm(x, w13, counts, a_rows=rows, activation="silu", tma=True)
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
    res["profile_tma"] = buf.getvalue()
    print(res["profile_tma"], flush=True)

    # the eager layer forward (Qwen3 shape), descriptor loads on and off
    cfg = MoEConfig.preset("qwen3")
    torch.manual_seed(0)
    moe = MoE(cfg, device=dev, dtype=torch.bfloat16)
    ok = gg.tma_ok
    for T in (16, 512, 4096):
        xt = torch.randn(T, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            for tma in (False, True, False, True):
                gg.tma_ok = ok if tma else (lambda a, w: False)
                ms = time_ms(lambda: moe(xt), dev, iters=30)
                host = host_us(lambda: moe(xt), calls=20, rounds=5)
                res["rows"].append({"what": "qwen3 eager forward", "T": T, "tma": tma,
                                    "ms": ms, "host_us": host})
                print(res["rows"][-1], flush=True)
        gg.tma_ok = ok
    write_json("probe_host.json", res)


if __name__ == "__main__":
    main()
