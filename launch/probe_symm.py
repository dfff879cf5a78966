"""Copy-engine exchange through symmetric memory, against NCCL, alone and beside GEMM work.

    torchrun --nproc-per-node N launch/probe_symm.py

A fixed-size all-to-all of S bytes per peer, three ways:
  nccl      all_to_all_single
  ce_pull   every rank copies its chunk out of each peer's symmetric send buffer
            (cudaMemcpyAsync over NVLink: copy engines, no SMs), a barrier before and after
  ce_pull_s the same, one side stream per peer (copies in parallel)
  ce_push   every rank copies its chunks into each peer's symmetric receive buffer
Each is checked (every chunk tagged by sender and receiver), timed alone (median of 20 after a
barrier), then timed issued first on a side stream beside a single-GPU Qwen3 layer forward
(8192 tokens) on the current stream. Finally ce_pull is captured in a CUDA graph and checked
and timed there. Rank 0 writes probe_symm.json under $OUT.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_ms, write_json  # noqa: E402


def main():
    dist.init_process_group("nccl")
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device())
    group_name = dist.group.WORLD.group_name
    if hasattr(symm, "enable_symm_mem_for_group"):
        symm.enable_symm_mem_for_group(group_name)
    res = {"W": W, "nvshmem": bool(symm.is_nvshmem_available())}
    MiB = 2**20
    top = 40 * MiB
    send = symm.empty(W * top, dtype=torch.uint8, device=device)
    recv_sym = symm.empty(W * top, dtype=torch.uint8, device=device)
    h_send = symm.rendezvous(send, group_name)
    h_recv = symm.rendezvous(recv_sym, group_name)
    recv = torch.empty(W * top, dtype=torch.uint8, device=device)
    streams = [torch.cuda.Stream() for _ in range(W)]
    peers = [(rank + s) % W for s in range(1, W)]

    def variants(S):
        def nccl():
            dist.all_to_all_single(recv[:W * S], send[:W * S])

        def ce_pull():
            h_send.barrier(channel=0)
            recv[rank * S:(rank + 1) * S].copy_(send[rank * S:(rank + 1) * S])
            for p in peers:
                recv[p * S:(p + 1) * S].copy_(h_send.get_buffer(p, (S,), torch.uint8, rank * S))
            h_send.barrier(channel=0)

        def ce_pull_s():
            h_send.barrier(channel=0)
            cur = torch.cuda.current_stream()
            recv[rank * S:(rank + 1) * S].copy_(send[rank * S:(rank + 1) * S])
            for p in peers:
                streams[p].wait_stream(cur)
                with torch.cuda.stream(streams[p]):
                    recv[p * S:(p + 1) * S].copy_(
                        h_send.get_buffer(p, (S,), torch.uint8, rank * S))
            for p in peers:
                cur.wait_stream(streams[p])
            h_send.barrier(channel=0)

        def ce_push():
            h_recv.barrier(channel=0)
            recv_sym[rank * S:(rank + 1) * S].copy_(send[rank * S:(rank + 1) * S])
            for p in peers:
                h_recv.get_buffer(p, (S,), torch.uint8, rank * S).copy_(send[p * S:(p + 1) * S])
            h_recv.barrier(channel=0)

        return {"nccl": (nccl, recv), "ce_pull": (ce_pull, recv), "ce_pull_s": (ce_pull_s, recv),
                "ce_push": (ce_push, recv_sym)}

    def fill(S):
        for p in range(W):
            send[p * S:(p + 1) * S].fill_(16 * rank + p)
        recv.zero_()
        recv_sym.zero_()

    def check(out, S):
        want = torch.cat([torch.full((S,), 16 * p + rank, dtype=torch.uint8, device=device)
                          for p in range(W)])
        return bool(torch.equal(out[:W * S], want))

    for mib in (1, 8, 34):
        S = mib * MiB
        for name, (fn, out) in variants(S).items():
            fill(S)
            dist.barrier()
            fn()
            torch.cuda.synchronize()
            ok = check(out, S)
            ms = time_ms(fn, device, 20, barrier=dist.barrier)
            res[f"{name}_{mib}MiB"] = {"ok": ok, "ms": ms,
                                       "busbw_gbs": S * (W - 1) / ms / 1e6}

    # beside GEMM work: a single-GPU Qwen3 layer forward
    from ep_moe import MoE, MoEConfig
    torch.manual_seed(0)
    layer = MoE(MoEConfig.preset("qwen3")).to(device, torch.bfloat16)
    x = torch.randn(8192, layer.config.hidden_size, device=device, dtype=torch.bfloat16)

    def compute():
        with torch.no_grad():
            layer(x)

    res["compute_ms"] = time_ms(compute, device, 20, barrier=dist.barrier)
    S = 34 * MiB
    side = torch.cuda.Stream()
    for name, (fn, _) in variants(S).items():
        def both():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            compute()
            torch.cuda.current_stream().wait_stream(side)
        res[f"{name}_beside_compute_ms"] = time_ms(both, device, 20, barrier=dist.barrier)
    res["compute_again_ms"] = time_ms(compute, device, 20, barrier=dist.barrier)

    # CUDA graph of ce_pull
    fn = variants(S)["ce_pull"][0]
    fill(S)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(4):
                fn()
        recv.zero_()
        dist.barrier()
        graph.replay()
        torch.cuda.synchronize()
        ok = check(recv, S)
        ms = time_ms(graph.replay, device, 10, barrier=dist.barrier) / 4
        res["ce_pull_graph_34MiB"] = {"ok": ok, "ms": ms, "busbw_gbs": S * (W - 1) / ms / 1e6}
    except Exception as e:  # noqa: BLE001 - a probe reports what failed
        res["ce_pull_graph_34MiB"] = {"error": repr(e)[:300]}

    gathered = [None] * W
    dist.all_gather_object(gathered, res)
    if rank == 0:
        write_json("probe_symm.json", gathered)
        for r, g in enumerate(gathered):
            print(r, {k: (round(v, 3) if isinstance(v, float) else
                          {a: (round(b, 3) if isinstance(b, float) else b) for a, b in v.items()}
                          if isinstance(v, dict) else v) for k, v in g.items()}, flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
