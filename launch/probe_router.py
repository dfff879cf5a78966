"""The router's inference top-k: one Triton kernel (`ep_moe.kernels.topk`) against torch's
top-k + softmax, alone and inside the single-GPU layer's forward, one GPU, CUDA-graph replay.

First the two are checked against each other (the same ids, weights within 1e-6), then timed
in turn, twice: the top-k alone on random fp32 logits, and the bf16 layer's no-grad forward
with the kernel on and off (off: the router's torch path, as a forward with gradients takes).
Writes probe_router.json under $OUT.

    python launch/probe_router.py [--presets qwen3 mixtral] [--tokens 16 512 4096 8192 16384]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import graph_time_us, write_json  # noqa: E402

import ep_moe.router as router_module  # noqa: E402
from ep_moe import MoE, MoEConfig  # noqa: E402
from ep_moe.kernels.topk import softmax_topk, topk_config  # noqa: E402

# (tokens a program, warps) tried beside the default
CONFIGS = [(1, 1), (2, 1), (4, 1), (8, 1), (4, 2), (8, 2), (16, 2), (8, 4), (16, 4), (32, 4),
           (64, 4), (128, 4), (256, 4)]


def torch_topk(logits, k):
    """The router's torch path for softmax + renormalised top-k."""
    top = logits.topk(k, dim=-1, sorted=True)
    return top.indices, top.values.softmax(-1)


class torch_router:
    """Within it, the router takes torch's ops even where the kernel could run."""

    def __enter__(self):
        self.saved = router_module._use_triton
        router_module._use_triton = lambda t: False

    def __exit__(self, *exc):
        router_module._use_triton = self.saved


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["qwen3", "mixtral"])
    p.add_argument("--tokens", nargs="+", type=int, default=[16, 512, 4096, 8192, 16384])
    p.add_argument("--layer-tokens", nargs="+", type=int, default=[16, 512, 4096, 16384])
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    for preset in args.presets:
        cfg = MoEConfig.preset(preset)
        E, K = cfg.num_experts, cfg.top_k
        for T in args.tokens:
            logits = torch.randn(T, E, device=dev) * 2
            ids, w = softmax_topk(logits, K, True)
            ref_ids, ref_w = torch_topk(logits, K)
            if not torch.equal(ids, ref_ids) or (w - ref_w).abs().max() > 1e-6:
                raise RuntimeError(f"{preset} T={T}: kernel and torch disagree")
            row = {"preset": preset, "T": T, "what": "topk",
                   "default_config": list(topk_config(E))}
            configs = {f"{bt}x{nw}": (bt, nw) for bt, nw in CONFIGS
                       if bt * triton.next_power_of_2(E) <= 16384}
            for name, c in configs.items():
                c_ids, c_w = softmax_topk(logits, K, True, c)
                if not torch.equal(c_ids, ids) or (c_w - w).abs().max() > 1e-6:
                    raise RuntimeError(f"{preset} T={T} config {name}: another result")
            calls = 20
            for rnd in range(2):
                row.setdefault("torch_us", []).append(
                    graph_time_us([lambda: torch_topk(logits, K)], calls, 20))
                row.setdefault("kernel_us", []).append(
                    graph_time_us([lambda: softmax_topk(logits, K, True)], calls, 20))
                for name, c in configs.items():
                    row.setdefault(f"config_{name}_us", []).append(graph_time_us(
                        [lambda c=c: softmax_topk(logits, K, True, c)], calls, 20))
            rows.append(row)
            print(row, flush=True)
        layer = MoE(cfg, device=dev, dtype=torch.bfloat16)
        for T in args.layer_tokens:
            x = torch.randn(T, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                y_fast, r_fast = layer(x, return_router_output=True)
                with torch_router():
                    y_slow, r_slow = layer(x, return_router_output=True)
            if not torch.equal(r_fast.topk_ids, r_slow.topk_ids):
                raise RuntimeError(f"{preset} T={T}: the layer's routes differ")
            row = {"preset": preset, "T": T, "what": "layer_fwd_graph",
                   "max_abs_diff": (y_fast.float() - y_slow.float()).abs().max().item()}

            def fwd():
                with torch.no_grad():
                    layer(x)

            calls = 2 if T >= 4096 else 10
            for rnd in range(4):  # the layer's time moves by more than the gain: 4 rounds
                with torch_router():
                    row.setdefault("torch_us", []).append(graph_time_us([fwd], calls, 20))
                row.setdefault("kernel_us", []).append(graph_time_us([fwd], calls, 20))
            rows.append(row)
            print(row, flush=True)
        del layer
        torch.cuda.empty_cache()
    write_json("probe_router.json", {"device": torch.cuda.get_device_name(dev), "rows": rows})
    for r in rows:
        best = min((k for k in r if k.startswith("config_")), key=lambda k: min(r[k]),
                   default=None)
        print(f"{r['preset']:8s} T={r['T']:6d} {r['what']:16s} torch "
              f"{'/'.join(f'{u:.1f}' for u in r['torch_us'])} us, kernel "
              f"{'/'.join(f'{u:.1f}' for u in r['kernel_us'])} us"
              + (f", best {best[7:-3]} {min(r[best]):.1f} us" if best else ""))


if __name__ == "__main__":
    main()
