"""Does torch's SM carve-out (`torch._C._set_sm_carveout_experimental`) reach the grouped GEMM?

A pipeline's exchanges need SMs while the experts' GEMMs run; torch's grouped GEMM (CUTLASS,
persistent) takes every SM unless told otherwise. Times `grouped_mm` on the Mixtral expert
shapes (a rank's 2 experts at W = 4, 8192 tokens per GPU, and the single GPU's 8) and a dense
bf16 GEMM (cuBLAS) with the carve-out unset and at 16, 32 and 66 SMs, by CUDA-graph replay;
if the time grows with the carve-out, the GEMM honours it. One GPU; JSON under $OUT.

    python launch/probe_carveout.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import graph_time_us, markdown_table, write_json  # noqa: E402

from ep_moe.experts import _grouped_mm  # noqa: E402

CARVEOUTS = [None, 16, 32, 66]


def main():
    dev = torch.device("cuda")
    D, I = 4096, 14336
    cases = {}
    for name, experts, rows in [("rank of W=4 (2 experts x 8192 rows)", 2, 8192),
                                ("single GPU (8 experts x 2048 rows)", 8, 2048)]:
        x = torch.randn(experts * rows, D, device=dev, dtype=torch.bfloat16)
        w = torch.randn(experts, 2 * I, D, device=dev, dtype=torch.bfloat16) * D ** -0.5
        offs = torch.arange(1, experts + 1, device=dev, dtype=torch.int32) * rows
        cases[f"grouped_mm gate/up, {name}"] = \
            lambda x=x, w=w, offs=offs: _grouped_mm(x, w.transpose(1, 2), offs=offs)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    cases["dense 8192^3 (cuBLAS)"] = lambda: a @ a
    rows = []
    for name, fn in cases.items():
        row = {"case": name}
        for c in CARVEOUTS:
            torch._C._set_sm_carveout_experimental(c)
            try:
                us = [graph_time_us([fn], 3, 10) for _ in range(2)]
            finally:
                torch._C._set_sm_carveout_experimental(None)
            row[f"carveout_{c}_us"] = min(us)
        row["slowdown_at_32"] = row["carveout_32_us"] / row["carveout_None_us"]
        rows.append(row)
        print(row, flush=True)
    write_json("probe_carveout.json", {"device": torch.cuda.get_device_name(dev),
                                       "torch": torch.__version__, "rows": rows})
    print(markdown_table(rows, ["case"] + [f"carveout_{c}_us" for c in CARVEOUTS]
                         + ["slowdown_at_32"]))


if __name__ == "__main__":
    main()
