"""From a transformers MoE model to expert parallelism in one call: `ep_moe.replace_moe_blocks`,
then every rank generates from its own prompt, checked against the unmodified model.

    python examples/hf_expert_parallel.py --block deepseek_v3       # one process
    torchrun --nproc-per-node 2 examples/hf_expert_parallel.py       # experts over 2 ranks

Every rank builds the same tiny random causal LM (same seed) whose MLPs are the given family's
sparse-MoE blocks; with a real checkpoint, `from_pretrained` it instead. `replace_moe_blocks`
swaps each block for an `ep_moe.MoE` that keeps this rank's share of the experts (routing,
shared experts, DeepSeek-V3's fp32 router as the block had them). Each rank then takes its own
prompt, one token longer per rank, and compares the logits and the greedy generation with a
copy of the unmodified model kept for that purpose only. The MoE forwards are collectives, so
`generate(..., synced_gpus=True)` keeps the ranks in lockstep.

Shapes: D hidden, I expert intermediate size, E experts.
"""

from __future__ import annotations

import argparse
import copy
from typing import Optional, Sequence

import torch

import ep_moe
from ep_moe.distributed import group_rank_and_size, init_distributed

BLOCKS = ("deepseek_v3", "qwen2", "qwen3", "mixtral")


def make_model(name: str, D: int, I: int, E: int, vocab: int):  # noqa: E741 (I as in notation)
    """A 2-layer transformers v5 causal LM whose MLPs are the family's sparse-MoE blocks (the
    first layer's dense where the family has dense layers), random weights."""
    import transformers

    # initializer_range: O(1) router logits, so the routing is not a near-tie everywhere
    common = dict(vocab_size=vocab, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, initializer_range=D ** -0.5)
    if name == "deepseek_v3":  # sigmoid scores, 4 groups with the best 2 kept, 2 shared
        config = transformers.DeepseekV3Config(
            moe_intermediate_size=I, intermediate_size=2 * I, n_routed_experts=E,
            num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=2,
            routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=D // 2,
            kv_lora_rank=D // 2, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **common)
    elif name == "qwen2":  # one shared expert behind a sigmoid gate
        config = transformers.Qwen2MoeConfig(
            moe_intermediate_size=I, shared_expert_intermediate_size=2 * I, num_experts=E,
            num_experts_per_tok=2, mlp_only_layers=[0], **common)
    elif name == "qwen3":
        config = transformers.Qwen3MoeConfig(
            moe_intermediate_size=I, num_experts=E, num_experts_per_tok=4, norm_topk_prob=True,
            head_dim=D // 4, mlp_only_layers=[0], **common)
    else:
        config = transformers.MixtralConfig(intermediate_size=I, num_local_experts=E,
                                            num_experts_per_tok=2, **common)
    return transformers.AutoModelForCausalLM.from_config(config)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", choices=BLOCKS, default="deepseek_v3", help="model family")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--tokens", type=int, default=8, help="prompt length on rank 0; rank r: r more")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, group=None) -> dict:
    """Build, replace, check this rank's prompt; print and return {"logits_error": largest
    logit difference relative to the largest logit, "same_tokens": whether the greedy
    generations are identical}. `group`: a process group already set up (tests); default the
    one torchrun started, or none."""
    args = parse_args(argv)
    group = group if group is not None else init_distributed()
    rank, world = group_rank_and_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")

    torch.manual_seed(args.seed)  # the same weights on every rank
    model = make_model(args.block, args.hidden, args.intermediate, args.experts, args.vocab)
    model.to(device).eval()
    reference = copy.deepcopy(model)  # only to check against
    replaced = ep_moe.replace_moe_blocks(model, process_group=group)

    g = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own prompt
    prompt = torch.randint(0, args.vocab, (1, args.tokens + rank), generator=g).to(device)
    with torch.no_grad():
        expected = reference(prompt).logits
        err = ((model(prompt).logits - expected).abs().max() / expected.abs().max()).item()
    greedy = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    tokens = model.generate(prompt, synced_gpus=world > 1, **greedy)
    same = torch.equal(tokens, reference.generate(prompt, **greedy))
    print(f"rank {rank}/{world}: {args.block}, {len(replaced)} blocks replaced, "
          f"{len(replaced[0].local_expert_ids)} of {args.experts} experts here; logits within "
          f"{err:.1e} of transformers', generation {'identical' if same else 'DIFFERENT'}: "
          f"{tokens[0, prompt.shape[1]:].tolist()}", flush=True)
    return {"logits_error": err, "same_tokens": same}


if __name__ == "__main__":
    main()
