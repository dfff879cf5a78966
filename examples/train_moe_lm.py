"""Train a small Mixtral-style language model whose MLPs are `ep_moe.MoE`, from scratch, on the
Python standard library's own source files, then generate text from a prompt.

    python examples/train_moe_lm.py                               # one process, CPU or a GPU
    torchrun --nproc-per-node 2 examples/train_moe_lm.py          # experts sharded over 2 ranks
    python examples/train_moe_lm.py --help                        # sizes, schedule, sampling

Model: bytes (V = 256) -> embedding -> L blocks of [RMSNorm, causal self-attention with rotary
embeddings, RMSNorm, MoE] -> RMSNorm -> LM head. Data: the standard library's top-level modules
as raw bytes; a file goes to validation when the CRC-32 of its name is 0 mod 10 (about one in
ten), a split that is fixed and independent of the ranks.

Data and expert parallel over the same W ranks. Every step draws one global batch of B windows
(the same on every rank); rank r trains on its B / W of them, in A micro-batches of B / (W A).
  - Each micro-batch's mean loss is scaled by 1 / (W A), so the gradients sum to those of the
    global batch's mean loss. The router's load-balancing loss is computed per micro-batch and
    its gradient scaled alike (`MoE.aux_loss_grad_scale`).
  - Expert weights live on one rank each. The dispatch's backward (the reverse all-to-all)
    brings every rank's contribution to the expert's owner: their gradients are complete.
  - Replicated weights (embedding, attention, norms, routers, head) get one all-reduce (sum).
So W ranks with A micro-batches each take exactly the step one process takes with W A
micro-batches on the same global batch, up to the order of floating-point sums.

Shapes: B sequences, S sequence length, D hidden, H heads, V vocabulary, L layers, T tokens,
E experts, K top-k, W ranks.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ep_moe
from ep_moe.distributed import group_rank_and_size, init_distributed

VOCAB_SIZE = 256  # bytes


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def load_stdlib_source() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val): the top-level `*.py` files of this Python's standard library as 1-D uint8
    tensors of bytes, files in sorted order."""
    splits = {"train": bytearray(), "val": bytearray()}
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if path.name.startswith("_sysconfigdata"):  # generated for this machine, not code
            continue
        split = "val" if zlib.crc32(path.name.encode()) % 10 == 0 else "train"
        splits[split] += path.read_bytes()
    return tuple(torch.frombuffer(b, dtype=torch.uint8) for b in splits.values())


def sample_windows(data: torch.Tensor, B: int, S: int, gen: torch.Generator) -> torch.Tensor:
    """B random windows of S + 1 bytes (inputs and their next-byte targets): (B, S + 1) int64."""
    starts = torch.randint(len(data) - S, (B,), generator=gen)
    return data[starts[:, None] + torch.arange(S + 1)].long()


def validation_batches(val_data: torch.Tensor, args: argparse.Namespace,
                       device) -> list[torch.Tensor]:
    """The fixed global batches of every validation estimate: `eval_batches` x (B, S + 1)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    return [sample_windows(val_data, args.batch, args.seq, gen).to(device)
            for _ in range(args.eval_batches)]


def micro_batches(batch: torch.Tensor, rank: int, W: int, A: int) -> list[torch.Tensor]:
    """This rank's A micro-batches of the global batch (B, S + 1): rank-major, so micro-batch a
    of rank r is micro-batch r A + a of one process running W A of them."""
    return list(batch.chunk(W * A)[rank * A:(rank + 1) * A])


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LMConfig:
    num_layers: int  # L
    num_heads: int  # H
    max_seq_len: int  # rotary tables are built for this many positions
    moe: ep_moe.MoEConfig  # hidden size D, experts E, top-k K, aux-loss coefficient
    vocab_size: int = VOCAB_SIZE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics: the mean of squares loses precision in 16 bits
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).type_as(x) \
            * self.weight


def rotary_tables(S: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, ...]:
    """cos, sin: (S, head_dim / 2) fp32, the angle of position s and frequency i being
    s / base^(2i / head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(S, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, S, hd), each pair (x[i], x[i + hd / 2]) rotated by its position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, D: int, H: int):
        super().__init__()
        self.num_heads = H
        self.wqkv = nn.Linear(D, 3 * D, bias=False)
        self.wo = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        qkv = self.wqkv(x).view(B, S, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, S, hd)
        q, k = apply_rotary(q, cos[:S], sin[:S]), apply_rotary(k, cos[:S], sin[:S])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, hd)
        return self.wo(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)), then h + moe(norm(h))."""

    def __init__(self, config: LMConfig, process_group=None):
        super().__init__()
        D = config.moe.hidden_size
        self.attn_norm = RMSNorm(D)
        self.attn = CausalSelfAttention(D, config.num_heads)
        self.moe_norm = RMSNorm(D)
        self.moe = ep_moe.MoE(config.moe, process_group=process_group)

    def forward(self, x, cos, sin) -> tuple[torch.Tensor, ep_moe.RouterOutput]:
        h = x + self.attn(self.attn_norm(x), cos, sin)
        y, route = self.moe(self.moe_norm(h), return_router_output=True)  # (B, S, D)
        return h + y, route


class LMOutput(NamedTuple):
    logits: torch.Tensor  # (B, S, V)
    load: torch.Tensor  # (L, E) int64 (token, slot) pairs routed to each expert, per layer
    aux_loss: torch.Tensor  # scalar, detached: the layers' load-balancing losses (0 in eval)


class MoELM(nn.Module):
    """Embedding -> L blocks -> RMSNorm -> LM head. With a `process_group` each MoE keeps its
    share of the experts; everything else is replicated."""

    def __init__(self, config: LMConfig, process_group=None):
        super().__init__()
        D, L = config.moe.hidden_size, config.num_layers
        if D % config.num_heads or (D // config.num_heads) % 2:
            raise ValueError(f"hidden size {D} must split into {config.num_heads} heads of an "
                             f"even size (rotary embeddings rotate pairs)")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, D)
        self.blocks = nn.ModuleList(Block(config, process_group) for _ in range(L))
        self.norm = RMSNorm(D)
        self.head = nn.Linear(D, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config.max_seq_len, D // config.num_heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # GPT-2 init; the projections into the residual stream scaled down by depth. The MoE
        # layers drew their own weights (MoEConfig.init_std) when built.
        for name, p in self.named_parameters():
            if name.endswith(("wqkv.weight", "wo.weight", "embed.weight", "head.weight")):
                std = 0.02 / math.sqrt(2 * L) if name.endswith("wo.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> LMOutput:
        """tokens: (B, S) int64, S <= max_seq_len."""
        x = self.embed(tokens)  # (B, S, D)
        loads, aux = [], x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, route = block(x, self.cos, self.sin)
            loads.append(route.num_tokens_per_expert)  # (E,)
            if route.aux_loss is not None:  # its gradient already rides on the MoE's output
                aux = aux + route.aux_loss.detach()
        return LMOutput(self.head(self.norm(x)), torch.stack(loads), aux)


def moe_layers(model: nn.Module) -> dict[str, ep_moe.MoE]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ep_moe.MoE)}


def split_parameters(model: nn.Module) -> tuple[list, list]:
    """(replicated, expert) parameters: the routed experts' weights are sharded over the ranks,
    everything else (routers and shared experts too) is replicated."""
    expert_ids = {id(p) for m in moe_layers(model).values() for p in m.experts.parameters()}
    params = list(model.parameters())
    return [p for p in params if id(p) not in expert_ids], \
        [p for p in params if id(p) in expert_ids]


# --------------------------------------------------------------------------------------------
# Checkpoints: the single-process model's state dict, whatever W
# --------------------------------------------------------------------------------------------

def full_state_dict(model: nn.Module) -> dict:
    """The replicated weights as they are, each MoE's experts gathered from every rank (a
    collective: every rank calls it)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, moe in moe_layers(model).items():
        state.update({f"{name}.{k}": v for k, v in moe.full_state_dict().items()})
    return state


def load_full_state_dict(model: nn.Module, state: dict) -> None:
    """Load `full_state_dict`'s output into a model of any W (each rank keeps its experts)."""
    moes = moe_layers(model)
    in_moe = {k for k in state if any(k.startswith(f"{name}.") for name in moes)}
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state.items() if k not in in_moe}, strict=False)
    missing = [k for k in missing if not any(k.startswith(f"{name}.") for name in moes)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")
    for name, moe in moes.items():
        prefix = f"{name}."
        moe.load_full_state_dict({k[len(prefix):]: v for k, v in state.items()
                                  if k.startswith(prefix)})


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup over `warmup` steps, then a cosine decay to `min_lr_ratio * lr`."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    min_lr = args.lr * args.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (args.lr - min_lr)


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (expert stacks included), not on norms."""
    params = list(model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95))


def all_reduce_replicated_grads(replicated: list, group) -> None:
    """Sum the replicated weights' gradients over the ranks in one flat all-reduce (each
    rank's loss already carries its 1 / (W A))."""
    if group is None or dist.get_world_size(group) == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in replicated]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    for p, chunk in zip(replicated, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p)


def clip_grad_norm(replicated: list, experts: list, max_norm: float, group) -> torch.Tensor:
    """Scale all gradients so that the global norm is at most `max_norm`; returns the norm.
    Replicated gradients are equal on every rank (after the all-reduce); the expert shards
    are disjoint, so their squares are summed over the ranks."""
    def sum_sq(params):
        return sum((p.grad.float().square().sum() for p in params if p.grad is not None),
                   torch.zeros((), device=replicated[0].device))

    expert_sq = sum_sq(experts)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(expert_sq, group=group)
    norm = (sum_sq(replicated) + expert_sq).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in replicated + experts:
        if p.grad is not None:
            p.grad.mul_(scale)
    return norm


def lm_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, LMOutput]:
    """Mean next-byte cross-entropy of batch (b, S + 1)."""
    out = model(batch[:, :-1])
    # fp32 loss: cross-entropy over V in 16 bits is too coarse
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
    return loss, out


class StepStats(NamedTuple):
    loss: float  # the global batch's mean loss
    aux_loss: float  # summed over layers, mean over micro-batches and ranks
    grad_norm: float
    load: torch.Tensor  # (L, E) int64, summed over micro-batches and ranks


def train_step(model, optimizer, params: tuple[list, list], batches: list[torch.Tensor],
               grad_scale: float, max_norm: float, group) -> StepStats:
    """Forward and backward of this rank's micro-batches, gradients reduced, one optimizer
    step. `grad_scale` = 1 / (W A), also set as every MoE's `aux_loss_grad_scale`."""
    replicated, experts = params
    L, E = model.config.num_layers, model.config.moe.num_experts
    # local sums: loss, aux loss, then the (L, E) loads; fp64 keeps the counts exact
    local = torch.zeros(2 + L * E, dtype=torch.float64, device=batches[0].device)
    for batch in batches:
        loss, out = lm_loss(model, batch)
        (loss * grad_scale).backward()
        local += torch.cat([(loss.detach() * grad_scale).view(1),
                            (out.aux_loss * grad_scale).view(1), out.load.flatten()]).double()
    all_reduce_replicated_grads(replicated, group)
    norm = clip_grad_norm(replicated, experts, max_norm, group)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(local, group=group)
    local = local.cpu()  # host sync: the figures are printed
    return StepStats(local[0].item(), local[1].item(), norm.item(),
                     local[2:].round().long().view(L, E))


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], rank: int, W: int, group) -> float:
    """Mean loss over the given global batches, each rank taking its B / W rows."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=batches[0].device)
    for batch in batches:
        total += lm_loss(model, micro_batches(batch, rank, W, 1)[0])[0].double() / W
    if group is not None and W > 1:
        dist.all_reduce(total, group=group)
    model.train()
    return total.item() / len(batches)


@torch.no_grad()
def generate(model, prompt: bytes, max_new_tokens: int, temperature: float, top_k: int,
             seed: int) -> bytes:
    """Sample bytes after the prompt: greedy at temperature 0, else from the `top_k` most
    likely bytes (0: all). Under W ranks every rank must call it with the same arguments:
    each forward is a collective, and every rank samples the same bytes."""
    model.eval()
    device = model.head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor(list(prompt), dtype=torch.long, device=device)[None]  # (1, S)
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.config.max_seq_len:]).logits[:, -1].float()  # (1, V)
        if temperature == 0:
            next_token = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        tokens = torch.cat([tokens, next_token], dim=1)
    model.train()
    return bytes(tokens[0].tolist())


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

@dataclass
class History:
    steps: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    aux_loss: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)  # before clipping
    lr: list = field(default_factory=list)
    load: list = field(default_factory=list)  # (L, E) per step
    val: list = field(default_factory=list)  # (step, loss)
    sample: str = ""  # the prompt and the generated text
    checkpoint: Optional[str] = None  # its path, on rank 0


def imbalance(load: torch.Tensor) -> torch.Tensor:
    """(L, E) counts -> (L,) max / mean load per layer: 1.0 is perfectly balanced, E is every
    token on one expert."""
    load = load.double()
    return load.max(-1).values / load.mean(-1).clamp(min=1e-9)


def format_shares(load: torch.Tensor) -> str:
    """Per layer, each expert's share of the (token, slot) pairs in percent."""
    shares = 100 * load.double() / load.sum(-1, keepdim=True).clamp(min=1)
    return "\n".join(f"  layer {i}: " + " ".join(f"{s:4.1f}" for s in row.tolist())
                     for i, row in enumerate(shares))


def save_plot(history: History, path: Path) -> bool:
    """Loss (train and validation) and per-layer max/mean expert load against the step, as a
    PNG; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(history.steps, history.loss, label="train", lw=1)
    if history.val:
        ax_loss.plot(*zip(*history.val), "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss (nats / byte)", title="next-byte loss")
    ax_loss.legend()
    per_layer = torch.stack([imbalance(load) for load in history.load])  # (steps, L)
    for i, curve in enumerate(per_layer.T):
        ax_load.plot(history.steps, curve.tolist(), lw=1, label=f"layer {i}")
    ax_load.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax_load.set(xlabel="step", ylabel="max / mean tokens per expert",
                title="expert load (1 = balanced)")
    ax_load.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--layers", type=_positive_int, default=4, help="L decoder blocks")
    m.add_argument("--hidden", type=_positive_int, default=128, help="D")
    m.add_argument("--heads", type=_positive_int, default=4, help="H attention heads")
    m.add_argument("--experts", type=_positive_int, default=8, help="E routed experts a layer")
    m.add_argument("--top-k", type=_positive_int, default=2, help="K experts a token")
    m.add_argument("--intermediate", type=_positive_int, default=256,
                   help="I, each expert's hidden size")
    m.add_argument("--aux-loss-coef", type=_non_negative_float, default=0.01,
                   help="weight of the router's load-balancing loss")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=_positive_int, default=600)
    t.add_argument("--batch", type=_positive_int, default=16,
                   help="B, sequences in the global batch (all ranks together)")
    t.add_argument("--micro-batches", type=_positive_int, default=1,
                   help="A, gradient-accumulation steps a rank splits its B / W sequences into")
    t.add_argument("--seq", type=_positive_int, default=128, help="S, bytes a sequence")
    t.add_argument("--lr", type=_positive_float, default=3e-3, help="peak learning rate")
    t.add_argument("--min-lr-ratio", type=_non_negative_float, default=0.1,
                   help="the cosine decays to this fraction of --lr")
    t.add_argument("--warmup", type=_positive_int, default=30, help="linear warmup steps")
    t.add_argument("--weight-decay", type=_non_negative_float, default=0.1)
    t.add_argument("--grad-clip", type=_positive_float, default=1.0, help="max global norm")
    t.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("reporting")
    r.add_argument("--log-interval", type=_positive_int, default=20)
    r.add_argument("--eval-interval", type=_positive_int, default=200,
                   help="validation loss and per-expert shares every this many steps")
    r.add_argument("--eval-batches", type=_positive_int, default=4,
                   help="global batches in a validation estimate")
    r.add_argument("--out-dir", type=Path, default=Path("out/train_moe_lm"),
                   help="where the checkpoint and the plot go")
    r.add_argument("--no-checkpoint", action="store_true")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default="def ")
    g.add_argument("--max-new-tokens", type=_non_negative_int, default=300)
    g.add_argument("--temperature", type=_non_negative_float, default=0.8,
                   help="0: greedy decoding")
    g.add_argument("--sample-top-k", type=_non_negative_int, default=10,
                   help="sample among this many most likely bytes (0: all)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None, world_size: int = 1) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k > args.experts:
        parser.error(f"--top-k ({args.top_k}) must be at most --experts ({args.experts})")
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        parser.error(f"--hidden ({args.hidden}) must split into --heads ({args.heads}) heads "
                     f"of an even size")
    if args.batch % (world_size * args.micro_batches):
        parser.error(f"--batch ({args.batch}) must be divisible by the ranks ({world_size}) "
                     f"times --micro-batches ({args.micro_batches})")
    if args.experts < world_size:
        parser.error(f"--experts ({args.experts}) must be at least the ranks ({world_size})")
    if not args.prompt:
        parser.error("--prompt must not be empty")
    return args


def build_model(args: argparse.Namespace, group, device) -> MoELM:
    moe = ep_moe.MoEConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_experts=args.experts, top_k=args.top_k,
                           aux_loss_coef=args.aux_loss_coef)
    config = LMConfig(num_layers=args.layers, num_heads=args.heads, max_seq_len=args.seq,
                      moe=moe)
    torch.manual_seed(args.seed)  # the same on every rank: replicated weights agree
    return MoELM(config, group).to(device)


def main(argv: Optional[Sequence[str]] = None, group=None) -> History:
    """Train, evaluate, save, plot and generate; returns the history (the same on every rank
    but for `checkpoint`, which rank 0 writes).
    `group`: a process group already set up (tests); default the one torchrun started."""
    group = group if group is not None else init_distributed()
    rank, W = group_rank_and_size(group)
    args = parse_args(argv, W)
    log = print if rank == 0 else (lambda *a, **k: None)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")

    train_data, val_data = load_stdlib_source()
    if min(len(train_data), len(val_data)) <= args.seq:
        raise ValueError(f"--seq {args.seq} is longer than the data "
                         f"({len(train_data)} train, {len(val_data)} validation bytes)")
    model = build_model(args, group, device)
    params = split_parameters(model)
    optimizer = make_optimizer(model, args)
    A = args.micro_batches
    for moe in moe_layers(model).values():  # the aux loss's gradient, scaled as the loss is
        moe.aux_loss_grad_scale = 1.0 / (W * A)
    train_gen = torch.Generator().manual_seed(args.seed)  # same on every rank
    val_batches = validation_batches(val_data, args, device)

    n_params = sum(p.numel() for p in model.parameters())
    E, K = args.experts, args.top_k
    log(f"data: {len(train_data):,} train / {len(val_data):,} validation bytes of "
        f"{sysconfig.get_paths()['stdlib']}/*.py")
    log(f"model: L={args.layers} D={args.hidden} H={args.heads} E={E} K={K} "
        f"I={args.intermediate}; {n_params:,} parameters on rank 0 "
        f"({len(model.blocks[0].moe.local_expert_ids)} of {E} experts a layer), W={W}, "
        f"B={args.batch} x S={args.seq} bytes a step, {A} micro-batch(es) a rank, {device}")

    history = History()
    history.val.append((0, evaluate(model, val_batches, rank, W, group)))
    log(f"step {0:5d} | val loss {history.val[-1][1]:.4f} (uniform: ln 256 = "
        f"{math.log(VOCAB_SIZE):.4f})")
    log_load = torch.zeros(args.layers, E, dtype=torch.long)  # since the last progress line
    window_load = torch.zeros_like(log_load)  # since the last per-expert shares
    t0, tokens_since = time.perf_counter(), 0
    for step in range(args.steps):
        lr = lr_at(step, args)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        batch = sample_windows(train_data, args.batch, args.seq, train_gen).to(device)
        stats = train_step(model, optimizer, params, micro_batches(batch, rank, W, A),
                           1.0 / (W * A), args.grad_clip, group)
        history.steps.append(step + 1)
        history.loss.append(stats.loss)
        history.aux_loss.append(stats.aux_loss)
        history.grad_norm.append(stats.grad_norm)
        history.lr.append(lr)
        history.load.append(stats.load)
        log_load += stats.load
        window_load += stats.load
        tokens_since += args.batch * args.seq
        done = step + 1
        if done % args.log_interval == 0 or done == args.steps:
            elapsed = time.perf_counter() - t0
            log(f"step {done:5d} | loss {stats.loss:.4f} | aux {stats.aux_loss:.4f} | "
                f"lr {lr:.2e} | grad norm {stats.grad_norm:5.2f} | "
                f"{tokens_since / elapsed:7.0f} tok/s | load max/mean "
                f"{imbalance(log_load).max().item():.2f}")
            t0, tokens_since = time.perf_counter(), 0
            log_load.zero_()
        if done % args.eval_interval == 0 or done == args.steps:
            t_eval = time.perf_counter()
            history.val.append((done, evaluate(model, val_batches, rank, W, group)))
            log(f"step {done:5d} | val loss {history.val[-1][1]:.4f} | expert shares (%) "
                f"since the last report ({1 / E:.1%} each when balanced):\n"
                f"{format_shares(window_load)}")
            window_load.zero_()
            t0 += time.perf_counter() - t_eval  # the evaluation is not training time

    state = full_state_dict(model)  # a collective: every rank gathers
    if rank == 0:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        if not args.no_checkpoint:
            history.checkpoint = str(args.out_dir / "ckpt.pt")
            # plain types only: torch.load(weights_only=True) reads it back
            torch.save({"model": state, "args": {**vars(args), "out_dir": str(args.out_dir)},
                        "step": args.steps, "val_loss": history.val[-1][1]},
                       history.checkpoint)
            log(f"checkpoint: {history.checkpoint}")
        plot = args.out_dir / "train_moe_lm.png"
        log(f"plot: {plot}" if save_plot(history, plot) else "plot: skipped (no matplotlib)")
    sample = generate(model, args.prompt.encode(), args.max_new_tokens, args.temperature,
                      args.sample_top_k, args.seed)
    history.sample = sample.decode("utf-8", errors="replace")
    log(f"sample (temperature {args.temperature}, top-k {args.sample_top_k}, "
        f"seed {args.seed}):\n{history.sample}")
    return history


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
