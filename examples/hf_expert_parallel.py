"""From a transformers MoE block to expert parallelism: `MoE.from_hf`, then the experts
sharded over the ranks, each rank's outputs checked against the block.

    python examples/hf_expert_parallel.py --block deepseek_v3       # one process
    torchrun --nproc-per-node 2 examples/hf_expert_parallel.py       # experts over 2 ranks

Every rank builds the same tiny transformers block (same seed) and the single-process layer
from it; the expert-parallel layer takes its config (routing, shared experts, DeepSeek-V3's
fp32 router) and keeps this rank's share of the experts (`load_full_state_dict`). In a real
model, load the checkpoint into the block (or its state dict straight into the single-process
layer) instead of the random weights here. Each rank then feeds its own tokens, a different
number on each, and compares with the block on the same tokens.

Shapes: T tokens on this rank, D hidden, I expert intermediate size, E experts.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
from torch import nn

import ep_moe
from ep_moe.distributed import group_rank_and_size, init_distributed

BLOCKS = ("deepseek_v3", "qwen2", "qwen3", "mixtral")


def make_block(name: str, D: int, I: int, E: int) -> nn.Module:  # noqa: E741 (I as in notation)
    """A transformers v5 sparse-MoE block of the given family at toy size."""
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    common = dict(hidden_size=D, experts_implementation="eager")
    if name == "deepseek_v3":  # sigmoid scores, 4 groups with the best 2 kept, 2 shared
        return DeepseekV3MoE(transformers.DeepseekV3Config(
            moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=2, n_group=4,
            topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5, **common))
    if name == "qwen2":  # one shared expert behind a sigmoid gate
        return Qwen2MoeSparseMoeBlock(transformers.Qwen2MoeConfig(
            moe_intermediate_size=I, shared_expert_intermediate_size=2 * I, num_experts=E,
            num_experts_per_tok=2, **common))
    if name == "qwen3":
        return Qwen3MoeSparseMoeBlock(transformers.Qwen3MoeConfig(
            moe_intermediate_size=I, num_experts=E, num_experts_per_tok=4, norm_topk_prob=True,
            **common))
    return MixtralSparseMoeBlock(transformers.MixtralConfig(
        intermediate_size=I, num_local_experts=E, num_experts_per_tok=2, **common))


@torch.no_grad()
def randomize(block: nn.Module, seed: int) -> None:
    """Weights (and a DeepSeek-V3 correction bias) a trained model might have: transformers
    leaves them empty until a model's init runs."""
    g = torch.Generator().manual_seed(seed)
    D = block.experts.gate_up_proj.shape[-1]
    for p in block.parameters():
        p.copy_(torch.empty(p.shape).normal_(0.0, D ** -0.5, generator=g))
    bias = getattr(block.gate, "e_score_correction_bias", None)
    if bias is not None:
        bias.copy_(torch.empty(bias.shape).normal_(0.0, 0.3, generator=g))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", choices=BLOCKS, default="deepseek_v3")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16, help="on rank 0; rank r takes r more")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, group=None) -> float:
    """Build, shard, run this rank's tokens forward and backward; print and return the largest
    difference from the block. `group`: a process group already set up (tests); default the
    one torchrun started, or none."""
    args = parse_args(argv)
    group = group if group is not None else init_distributed()
    rank, world = group_rank_and_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")

    block = make_block(args.block, args.hidden, args.intermediate, args.experts)
    randomize(block, args.seed)  # the same on every rank
    block.to(device).eval()
    full = ep_moe.MoE.from_hf(block)  # fp32, single process: the full state dict
    layer = ep_moe.MoE(full.config, process_group=group, device=device)
    layer.load_full_state_dict(full.state_dict())  # keeps this rank's experts
    layer.eval()

    g = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own tokens
    x = torch.randn(args.tokens + rank, args.hidden, generator=g).to(device)
    with torch.no_grad():
        expected = block(x[None])[0]
    y = layer(x.requires_grad_())
    err = (y.detach() - expected).abs().max().item()
    y.square().sum().backward()  # the experts' gradients flow back through the exchange
    if not torch.isfinite(x.grad).all():
        raise RuntimeError(f"rank {rank}: non-finite input gradient")
    print(f"rank {rank}/{world}: {args.block}, {x.shape[0]} tokens, "
          f"{len(layer.local_expert_ids)} of {args.experts} experts here, "
          f"max |ours - transformers| = {err:.2e}", flush=True)
    return err


if __name__ == "__main__":
    main()
