"""`MoE.from_hf`: a layer built from a transformers v5 sparse-MoE block computes what the block
computes. Tiny blocks: D=32 hidden, I=48 intermediate, E=8 experts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ep_moe import MoE

from conftest import DEVICE

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DeepseekV3Config,
    MixtralConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import (  # noqa: E402
    Qwen2MoeSparseMoeBlock,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import (  # noqa: E402
    Qwen3MoeSparseMoeBlock,
)

D, I, E = 32, 48, 8  # noqa: E741 (I: intermediate size, in the package notation)
SHARED_I = 40  # the shared MLP's size, unlike I so a mix-up shows in the shapes
# fp32 both sides, same routing: the two differ only in summation order (the HF block adds
# the K expert outputs with index_add_, ep_moe in the fused combine; on a GPU the GEMMs sum in
# other orders too): a few fp32 ulps of the outputs' scale. On an H100 one element of
# DeepSeek-V3's block, where the experts' sum nearly cancels, came out 1.7e-6 apart.
RTOL, ATOL = 1e-5, 1e-5


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


def qwen2_block(top_k=4, norm_topk_prob=False):
    config = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E,
                            shared_expert_intermediate_size=SHARED_I, num_experts_per_tok=top_k,
                            norm_topk_prob=norm_topk_prob, experts_implementation="eager")
    return Qwen2MoeSparseMoeBlock(config)


def deepseek_block(top_k=2, n_group=4, topk_group=2, norm_topk_prob=True, n_shared=2):
    config = DeepseekV3Config(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E,
                              num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
                              norm_topk_prob=norm_topk_prob, n_shared_experts=n_shared,
                              routed_scaling_factor=2.5, experts_implementation="eager")
    return DeepseekV3MoE(config)


def make_inputs(block, shape=(2, 7), seed=0):
    """Random weights (HF leaves them empty or zero until a model's init runs) and x (*shape, D).
    std 1/sqrt(D) keeps pre-activations O(1) and the router's scores far from uniform. A
    DeepSeek-V3 correction bias as large as the sigmoid scores' spread, so it changes which
    experts are picked (and a layer that ignored it would differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.empty(p.shape).normal_(0.0, D ** -0.5, generator=g))
        bias = getattr(block.gate, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.empty(bias.shape).normal_(0.0, 0.3, generator=g))
    block.to(DEVICE).eval()
    return torch.randn(*shape, D, generator=g).to(DEVICE)


BLOCKS = {
    "mixtral_top2": lambda: mixtral_block(top_k=2),
    "mixtral_top4_gelu": lambda: mixtral_block(top_k=4, hidden_act="gelu"),
    "qwen3_top4_norm": lambda: qwen3_block(top_k=4, norm_topk_prob=True),
    "qwen3_top4_raw": lambda: qwen3_block(top_k=4, norm_topk_prob=False),
    "qwen3_top2_norm": lambda: qwen3_block(top_k=2, norm_topk_prob=True),
    "qwen2_shared_gate": lambda: qwen2_block(top_k=4, norm_topk_prob=False),
    "qwen2_shared_gate_norm": lambda: qwen2_block(top_k=2, norm_topk_prob=True),
    "deepseek_v3_groups": lambda: deepseek_block(top_k=2, n_group=4, topk_group=2),
    "deepseek_v3_one_group_raw": lambda: deepseek_block(top_k=3, n_group=1, topk_group=1,
                                                        norm_topk_prob=False, n_shared=1),
    "deepseek_v3_no_shared": lambda: deepseek_block(n_shared=0),  # an empty shared MLP
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


def test_shared_and_deepseek_config_and_copies():
    block = deepseek_block(top_k=2, n_group=4, topk_group=2, n_shared=2)
    make_inputs(block)
    moe = MoE.from_hf(block)
    c = moe.config
    assert (c.score_func, c.norm_topk_prob, c.num_expert_groups, c.topk_groups,
            c.use_correction_bias, c.routed_scaling_factor) == ("sigmoid", True, 4, 2, True, 2.5)
    assert (c.num_shared_experts, c.shared_size, c.shared_expert_gate) == (1, 2 * I, False)
    assert torch.equal(moe.router.e_score_correction_bias, block.gate.e_score_correction_bias)
    mlp = block.shared_experts
    assert torch.equal(moe.shared_experts.gate_up_proj,
                       torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert torch.equal(moe.shared_experts.down_proj, mlp.down_proj.weight)

    block = qwen2_block()
    make_inputs(block)
    moe = MoE.from_hf(block)
    c = moe.config
    assert (c.score_func, c.norm_topk_prob, c.use_correction_bias) == ("softmax", False, False)
    assert (c.num_shared_experts, c.shared_size, c.shared_expert_gate) == (1, SHARED_I, True)
    assert torch.equal(moe.shared_experts.gate, block.shared_expert_gate.weight)


def test_deepseek_router_stays_fp32():
    # transformers keeps DeepSeek-V3's gate weight and bias in fp32 in a bf16 model; the layer
    # does too, so both pick the same experts from the same fp32 logits
    block = deepseek_block(top_k=2, n_group=4, topk_group=2)
    x = make_inputs(block, shape=(4, 16)).bfloat16()
    gate = {k: v.clone() for k, v in block.gate.state_dict().items()}  # fp32 values
    block.bfloat16()
    block.gate.float()
    block.gate.load_state_dict(gate)  # not bf16-rounded: a bf16 router would route otherwise
    moe = MoE.from_hf(block)
    assert moe.experts.gate_up_proj.dtype == torch.bfloat16
    assert moe.router.weight.dtype == moe.router.e_score_correction_bias.dtype == torch.float32
    # the config carries it: a layer built from it (an expert-parallel one too) keeps it
    assert moe.config.router_fp32
    assert MoE(moe.config, dtype=torch.bfloat16).router.weight.dtype == torch.float32
    with torch.no_grad():
        _, hf_weights, hf_ids = block.gate(x)
        y, route = moe(x, return_router_output=True)
        expected = block(x)
    order = hf_ids.sort(-1)
    assert torch.equal(route.topk_ids.sort(-1).values, order.values)
    torch.testing.assert_close(route.topk_weights.gather(-1, route.topk_ids.sort(-1).indices),
                               hf_weights.float().gather(-1, order.indices), rtol=1e-6, atol=0)
    # bf16 experts on both sides: the two differ by bf16 roundings in different places
    err = ((y.float() - expected.float()).norm() / expected.float().norm()).item()
    assert err < 2e-2, err


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
    # a shared MLP alone is not a sparse block
    with pytest.raises(TypeError, match="DeepseekV3MoE.*got Qwen2MoeMLP"):
        MoE.from_hf(qwen2_block().shared_expert)


def test_unsupported_activation():
    with pytest.raises(ValueError, match="gelu_pytorch_tanh"):
        MoE.from_hf(mixtral_block(hidden_act="gelu_pytorch_tanh"))
