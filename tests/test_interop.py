"""`MoE.from_hf`: a layer built from a transformers v5 sparse-MoE block computes what the block
computes. Tiny blocks: D=32 hidden, I=48 intermediate, E=8 experts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ep_moe import MoE

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, Qwen3MoeConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import (  # noqa: E402
    Qwen2MoeSparseMoeBlock,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import (  # noqa: E402
    Qwen3MoeSparseMoeBlock,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
D, I, E = 32, 48, 8  # noqa: E741 (I: intermediate size, in the package notation)
# fp32 both sides, same routing: the two differ only in summation order (the HF block adds
# the K expert outputs with index_add_, ep_moe in the fused combine): a few fp32 ulps.
RTOL, ATOL = 1e-5, 1e-6


def mixtral_block(top_k=2, hidden_act="silu"):
    config = MixtralConfig(hidden_size=D, intermediate_size=I, num_local_experts=E,
                           num_experts_per_tok=top_k, hidden_act=hidden_act,
                           experts_implementation="eager")
    return MixtralSparseMoeBlock(config)


def qwen3_block(top_k=4, norm_topk_prob=True, hidden_act="silu"):
    config = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E,
                            num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
                            hidden_act=hidden_act, experts_implementation="eager")
    return Qwen3MoeSparseMoeBlock(config)


def make_inputs(block, shape=(2, 7), seed=0):
    """Random weights (HF leaves them empty or zero until a model's init runs) and x (*shape, D).
    std 1/sqrt(D) keeps pre-activations O(1) and the router's scores far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.empty(p.shape).normal_(0.0, D ** -0.5, generator=g))
    block.to(DEVICE).eval()
    return torch.randn(*shape, D, generator=g).to(DEVICE)


BLOCKS = {
    "mixtral_top2": lambda: mixtral_block(top_k=2),
    "mixtral_top4_gelu": lambda: mixtral_block(top_k=4, hidden_act="gelu"),
    "qwen3_top4_norm": lambda: qwen3_block(top_k=4, norm_topk_prob=True),
    "qwen3_top4_raw": lambda: qwen3_block(top_k=4, norm_topk_prob=False),
    "qwen3_top2_norm": lambda: qwen3_block(top_k=2, norm_topk_prob=True),
}


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("shape", [(2, 7), (1, 1)])  # (B, S) as the HF block takes it; one token
def test_same_outputs(name, shape):
    block = BLOCKS[name]()
    x = make_inputs(block, shape)
    moe = MoE.from_hf(block)
    assert not moe.training
    assert moe.router.weight.device == block.gate.weight.device
    with torch.no_grad():
        expected = block(x)
        y = moe(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, expected, rtol=RTOL, atol=ATOL)
    # the same on the flattened (T, D) tokens
    torch.testing.assert_close(moe(x.reshape(-1, D)).detach(), expected.reshape(-1, D),
                               rtol=RTOL, atol=ATOL)


def test_config_and_copies():
    block = qwen3_block(top_k=4, norm_topk_prob=False, hidden_act="gelu")
    make_inputs(block)
    moe = MoE.from_hf(block)
    c = moe.config
    assert (c.hidden_size, c.intermediate_size, c.num_experts, c.top_k) == (D, I, E, 4)
    assert (c.score_func, c.norm_topk_prob, c.activation, c.gated) == \
        ("softmax", False, "gelu", True)
    assert torch.equal(moe.router.weight, block.gate.weight)
    assert torch.equal(moe.experts.gate_up_proj, block.experts.gate_up_proj)
    assert torch.equal(moe.experts.down_proj, block.experts.down_proj)
    with torch.no_grad():  # copies, not shared storage
        block.experts.down_proj.zero_()
    assert moe.experts.down_proj.abs().sum() > 0


def test_dtype_argument():
    block = mixtral_block()
    make_inputs(block)
    moe = MoE.from_hf(block, dtype=torch.bfloat16)
    assert moe.experts.gate_up_proj.dtype == torch.bfloat16
    torch.testing.assert_close(moe.experts.gate_up_proj.float(), block.experts.gate_up_proj,
                               rtol=2.0**-8, atol=0.0)  # one bf16 rounding


def test_wrong_block_type():
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock.*got Linear"):
        MoE.from_hf(nn.Linear(D, D))
    # a close relative with a shared expert is refused, not silently half-converted
    qwen2 = Qwen2MoeSparseMoeBlock(transformers.Qwen2MoeConfig(
        hidden_size=D, moe_intermediate_size=I, shared_expert_intermediate_size=I,
        num_experts=E, num_experts_per_tok=2))
    with pytest.raises(TypeError, match="Qwen2MoeSparseMoeBlock"):
        MoE.from_hf(qwen2)


def test_unsupported_activation():
    with pytest.raises(ValueError, match="gelu_pytorch_tanh"):
        MoE.from_hf(mixtral_block(hidden_act="gelu_pytorch_tanh"))
