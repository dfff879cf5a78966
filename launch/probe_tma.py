"""The grouped GEMM's tiles loaded through tensor descriptors (Hopper's TMA) against per-thread
pointer loads, on the layer's shapes, one GPU. Each variant is checked bitwise against the
pointer-load kernel with the same config and against torch's path, then the variants are timed
by CUDA-graph replay, in turn, twice (a difference smaller than a variant's two readings is
noise). Writes probe_tma.json under $OUT.

    python launch/probe_tma.py [--presets qwen3 mixtral] [--tokens 64 512 4096 16384]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import graph_time_us, markdown_table, write_json  # noqa: E402
from sweep_gemm import ceilings, gemm_cases, rel  # noqa: E402

from ep_moe.experts import _grouped_mm  # noqa: E402
from ep_moe.kernels.activation import gated_activation  # noqa: E402
from ep_moe.kernels.grouped_gemm import GemmConfig, gemm_config, grouped_gemm  # noqa: E402

# extra configs for the descriptor loads: longer K tiles (fewer, larger copies), fewer stages
EXTRA = {1: [(128, 128, 128, 8, 8, 3), (128, 64, 128, 8, 4, 3)],
         2: [(128, 256, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 2)]}
# --sweep NAME: more tiles, descriptor loads only (the first probe found longer K tiles slower)
SWEEPS = {
    "wide": {1: [(128, 128, 64, 8, 8, 3), (128, 128, 64, 4, 8, 4), (128, 128, 64, 16, 8, 4),
                 (128, 64, 64, 8, 4, 4), (128, 64, 64, 8, 4, 5), (64, 128, 64, 8, 4, 4),
                 (128, 128, 32, 8, 8, 6)],
             2: [(128, 256, 64, 8, 8, 3), (128, 256, 64, 4, 8, 4), (128, 256, 64, 16, 8, 4),
                 (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4), (128, 256, 32, 8, 8, 6),
                 (64, 256, 64, 8, 8, 4)]},
    # few experts (Mixtral): groups spanning every row block, i.e. column tiles in turn
    "group": {1: [(128, 128, 64, 16, 8, 4), (128, 128, 64, 32, 8, 4), (128, 128, 64, 16, 8, 3),
                  (64, 128, 64, 16, 4, 4)],
              2: [(128, 128, 128, 8, 8, 3), (128, 128, 128, 16, 8, 3), (128, 256, 64, 16, 8, 4),
                  (128, 128, 64, 16, 8, 4), (64, 128, 64, 16, 4, 4)]},
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["qwen3", "mixtral"])
    p.add_argument("--tokens", nargs="+", type=int, default=[64, 512, 4096, 16384])
    p.add_argument("--sweep", choices=list(SWEEPS), help="more tiles, descriptor loads only")
    args = p.parse_args()
    extra = SWEEPS[args.sweep] if args.sweep else EXTRA
    dev = torch.device("cuda")
    copy_gbs, mm_tflops = ceilings(dev)
    rows = []
    # Mixtral takes torch's path from 256 rows per expert
    cases = gemm_cases(args.presets, args.tokens, dev, copy_gbs, mm_tflops,
                       skip=lambda preset, T: preset == "mixtral" and T > 4096)
    for preset, T, K, w13, w2, case in cases:
        x, src, counts, offs, h_ref, y_ref, floors = case
        E = w13.shape[0]
        P = T * K
        calls, replays = (3, 10) if T >= 4096 else (10, 20)
        torch_fns = {1: lambda: gated_activation(
            _grouped_mm(x[src], w13.transpose(1, 2), offs=offs), "silu"),
            2: lambda: _grouped_mm(h_ref, w2.transpose(1, 2), offs=offs)}
        for gemm in (1, 2):
            default = gemm_config(P / E, gemm == 1, num_experts=E)
            cfgs = [default] + [GemmConfig(*c) for c in extra[gemm]
                                if T >= 256 and GemmConfig(*c) != default]

            def fn(cfg, tma, persistent=False, gemm=gemm):
                if gemm == 1:
                    return lambda: grouped_gemm(x, w13, counts, a_rows=src, activation="silu",
                                                config=cfg, tma=tma, persistent=persistent)
                return lambda: grouped_gemm(h_ref, w2, counts, config=cfg, tma=tma,
                                            persistent=persistent)

            variants = {"pointers": fn(default, False), "tma": fn(default, True),
                        "tma_persistent": fn(default, True, True)}
            for c in cfgs[1:]:
                variants["tma_" + "_".join(map(str, c))] = fn(c, True)
                if not args.sweep:
                    variants["pointers_" + "_".join(map(str, c))] = fn(c, False)
            ref = h_ref if gemm == 1 else y_ref
            base = variants["pointers"]()
            row = {"preset": preset, "T": T, "gemm": gemm, "default": list(default),
                   "floor_us": floors[gemm]}
            for name, f in variants.items():
                try:
                    out = f()
                    err = rel(out, ref)
                    row[f"{name}_err"] = err
                    if not err < 2e-2:
                        raise RuntimeError(f"rel err {err:.3g} vs torch")
                    if name in ("tma", "tma_persistent"):
                        row[f"{name}_same"] = bool(torch.equal(out, base))
                except Exception as exc:  # a config that does not compile or fit: go on
                    row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    variants[name] = None
            timed = {"torch": torch_fns[gemm], **{k: v for k, v in variants.items() if v}}
            for rnd in range(2):
                for name, f in timed.items():
                    row.setdefault(f"{name}_us", []).append(
                        graph_time_us([f], calls, replays))
            for name in timed:
                row[f"{name}_vs_floor"] = min(row[f"{name}_us"]) / floors[gemm]
            rows.append(row)
            print({k: ([round(u, 1) for u in v] if isinstance(v, list) and k.endswith("us")
                       else round(v, 3) if isinstance(v, float) else v)
                   for k, v in row.items()}, flush=True)
    write_json(f"probe_tma_{args.sweep}.json" if args.sweep else "probe_tma.json",
               {"device": torch.cuda.get_device_name(dev), "copy_ceiling_gbs": copy_gbs,
                "matmul_ceiling_tflops": mm_tflops, "rows": rows})
    table = [{"preset": r["preset"], "T": r["T"], "gemm": r["gemm"],
              "floor": round(r["floor_us"], 1),
              **{k[:-3]: "/".join(f"{u:.0f}" for u in r[k]) for k in
                 ("torch_us", "pointers_us", "tma_us", "tma_persistent_us") if k in r}}
             for r in rows]
    print(markdown_table(table, list(table[0])))


if __name__ == "__main__":
    main()
