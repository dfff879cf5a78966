"""A Mixtral-style decoder block with `ep_moe.MoE` as its MLP, trained for one step.

    python examples/mixtral_block.py                          # CPU, or one GPU if present
    torchrun --nproc-per-node 2 examples/mixtral_block.py     # experts sharded over 2 ranks

Under torchrun every rank holds the same attention, norms and router (same seed) and 1/W of
the experts; each rank feeds its own tokens, and the MoE layer sends them to the experts' owners
and back. (In real data-parallel training the replicated weights' gradients would then be
all-reduced over the ranks; one step here only shows that forward and backward run.)

Shapes: B batch, S sequence, D hidden, H heads, V vocabulary.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import ep_moe
from ep_moe.distributed import init_distributed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics: the mean of squares loses precision in bf16
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) \
            * self.weight


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention (no rotary embedding or KV cache: not the point here)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, D // self.num_heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)  # (B, H, S, D/H)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class MixtralBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + moe(norm(h))."""

    def __init__(self, config: ep_moe.MoEConfig, num_heads: int, process_group=None,
                 device=None, dtype=None):
        super().__init__()
        D = config.hidden_size
        self.attn_norm = RMSNorm(D)
        self.attn = CausalSelfAttention(D, num_heads)
        self.moe_norm = RMSNorm(D)
        self.to(device=device, dtype=dtype)
        self.moe = ep_moe.MoE(config, process_group=process_group, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x))
        return h + self.moe(self.moe_norm(h))


class TinyLM(nn.Module):
    """Embedding -> MixtralBlock -> norm -> LM head: enough to get a next-token loss."""

    def __init__(self, config: ep_moe.MoEConfig, vocab_size: int, num_heads: int,
                 process_group=None, device=None, dtype=None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.block = MixtralBlock(config, num_heads, process_group, device, dtype)
        self.norm = RMSNorm(config.hidden_size).to(device=device, dtype=dtype)
        self.head = nn.Linear(config.hidden_size, vocab_size, bias=False, device=device,
                              dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, S) int64 -> logits (B, S, V)."""
        return self.head(self.norm(self.block(self.embed(tokens))))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=96)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> ep_moe.MoEConfig:
    return ep_moe.MoEConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_experts=args.experts, top_k=args.top_k,
                            aux_loss_coef=args.aux_loss_coef)


def train_step(model: TinyLM, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token loss on tokens (B, S+1), backpropagated; returns the loss."""
    model.train()
    logits = model(tokens[:, :-1])  # (B, S, V)
    # fp32 loss: cross-entropy over V in bf16 is too coarse
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()  # the router's aux loss rides along with the MoE output's gradient
    return loss


def main(argv: Optional[Sequence[str]] = None) -> float:
    """One forward + backward on random tokens; prints and returns this rank's loss."""
    args = parse_args(argv)
    group = init_distributed()  # None unless launched by torchrun
    rank = torch.distributed.get_rank(group) if group is not None else 0
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32

    config = make_config(args)
    torch.manual_seed(args.seed)  # same on every rank: replicated weights agree
    model = TinyLM(config, args.vocab, args.heads, group, device, dtype)
    g = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own tokens
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    loss = train_step(model, tokens).item()

    print(f"rank {rank}: loss {loss:.4f} on {args.batch * args.seq} tokens "
          f"({len(model.block.moe.local_expert_ids)} of {config.num_experts} experts here)")
    if group is not None:
        torch.distributed.destroy_process_group()
    return loss


if __name__ == "__main__":
    main()
