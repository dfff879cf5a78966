"""`replace_moe_blocks` on tiny transformers v5 causal LMs (Mixtral, Qwen3-MoE, Qwen2-MoE,
DeepSeek-V3), always against the unmodified model on the same weights: logits, router logits,
greedy generation, one training step (loss, aux_loss, every gradient), a save_pretrained /
from_pretrained round trip, the experts sharded over 2 gloo ranks, and a real-shape bf16 model
on a GPU.

Tiny models: V=64 vocab, D=32 hidden, I=48 expert intermediate, E=8 experts, 2 decoder layers.
Every layer of Mixtral is sparse; the others have a dense layer 0 and a sparse layer 1 (so the
replacement must leave dense MLPs alone). Under TRITON_INTERPRET=1 each MoE forward costs a
fraction of a second, so prompts and generations are short.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import ep_moe
from ep_moe.interop import config_from_hf

transformers = pytest.importorskip("transformers")

V, D, I, E = 64, 32, 48, 8  # noqa: E741 (I: intermediate size, in the package notation)
FAMILIES = ("mixtral", "qwen3", "qwen2", "deepseek_v3")
BLOCK_TYPES = {"mixtral": "MixtralSparseMoeBlock", "qwen3": "Qwen3MoeSparseMoeBlock",
               "qwen2": "Qwen2MoeSparseMoeBlock", "deepseek_v3": "DeepseekV3MoE"}
# fp32 on both sides, the same routing: the models differ only in the order the K expert
# outputs (and, in gradients, the tokens' contributions to a weight) are summed; measured at
# most 1e-6 of the largest value, through two decoder layers and the loss
RTOL = 1e-5


def hf_config(family: str):
    # initializer_range 0.2: O(1) router logits, so routing is far from ties, and logits
    # spread enough that greedy decoding has clear winners
    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=64)
    if family == "mixtral":  # training-time input jitter, which the replacement reproduces
        return transformers.MixtralConfig(intermediate_size=I, num_local_experts=E,
                                          num_experts_per_tok=2, router_jitter_noise=0.1,
                                          **common)
    if family == "qwen3":
        return transformers.Qwen3MoeConfig(moe_intermediate_size=I, num_experts=E,
                                           num_experts_per_tok=4, norm_topk_prob=True,
                                           head_dim=8, mlp_only_layers=[0], **common)
    if family == "qwen2":  # a gated shared expert, of another size than the routed ones
        return transformers.Qwen2MoeConfig(moe_intermediate_size=I, num_experts=E,
                                           shared_expert_intermediate_size=40,
                                           num_experts_per_tok=2, mlp_only_layers=[0],
                                           **common)
    # sigmoid scores, 4 groups with the best 2 kept, a shared expert; MLA needs as many key /
    # value heads as query heads
    return transformers.DeepseekV3Config(
        moe_intermediate_size=I, intermediate_size=64, n_routed_experts=E, num_experts_per_tok=2,
        n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, **{**common, "num_key_value_heads": 4})


def make_model(family: str, seed: int = 0):
    """The tiny causal LM, in eval mode, its weights drawn from `seed`."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family))
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:  # transformers zeroes it: make it change the selection
                bias.normal_(0.0, 0.3)
    return model.eval()


def moe_block_names(model) -> list[str]:
    kinds = tuple(BLOCK_TYPES.values())
    return [n for n, m in model.named_modules() if type(m).__name__ in kinds]


def outside(model, block_names) -> dict:
    """{name: parameter} of the parameters outside the named blocks."""
    prefixes = tuple(f"{n}." for n in block_names)
    return {k: p for k, p in model.named_parameters() if not k.startswith(prefixes)}


def rel_close(actual, expected, rtol=RTOL) -> None:
    """Within rtol of the largest magnitude of `expected` (elementwise rtol would judge values
    near zero by their own size)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=0.0,
                               atol=rtol * expected.abs().max().item() + 1e-30)


def router_logits_of(out):
    """The router logits an output carries: a tuple, or None where the model class records
    none (DeepSeek-V3 in transformers 5.17)."""
    return getattr(out, "router_logits", None)


def check_router_logits(actual, expected) -> None:
    if expected is None:
        assert actual is None
        return
    assert isinstance(actual, tuple) and len(actual) == len(expected)
    for a, e in zip(actual, expected):
        rel_close(a, e)


def prompt(seed: int, length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, new_tokens: int, **kwargs) -> torch.Tensor:
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **kwargs)


# --------------------------------------------------------------------------------------------
# One process
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_router_logits_and_generation(family):
    ref = make_model(family)
    x = prompt(1, 9, batch=2)
    with torch.no_grad():  # transformers installs its output-capture hooks on first use
        expected = ref(x, output_router_logits=True)
    model = copy.deepcopy(ref)  # hooks installed: the replacement must record all the same
    names = moe_block_names(ref)
    replaced = ep_moe.replace_moe_blocks(model)

    assert [r.name for r in replaced] == names and len(names) == (2 if family == "mixtral" else 1)
    for r in replaced:
        block = ref.get_submodule(r.name)
        assert r.block_type == BLOCK_TYPES[family]
        assert r.config == config_from_hf(block)
        assert (r.config.num_experts, r.local_expert_ids) == (E, tuple(range(E)))
        assert isinstance(model.get_submodule(r.name), ep_moe.HFMoEBlock)
    assert moe_block_names(model) == []
    # the dense MLPs and the rest of the model are left as they were
    others, ref_others = outside(model, names), outside(ref, names)
    assert others.keys() == ref_others.keys()
    assert all(torch.equal(others[k], ref_others[k]) for k in others)

    with torch.no_grad():
        out = model(x, output_router_logits=True)
    rel_close(out.logits, expected.logits)
    check_router_logits(router_logits_of(out), router_logits_of(expected))
    if getattr(expected, "aux_loss", None) is not None:  # inference too reports it
        rel_close(out.aux_loss, expected.aux_loss)

    assert torch.equal(greedy(model, x, 5), greedy(ref, x, 5))


def moe_grads_expected(block) -> dict:
    """{MoE parameter name: gradient} from a transformers block's parameter gradients, mapped
    by hand (independently of `ep_moe.interop`)."""
    grads = {"router.weight": block.gate.weight.grad,
             "experts.gate_up_proj": block.experts.gate_up_proj.grad,
             "experts.down_proj": block.experts.down_proj.grad}
    mlp = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if mlp is not None:
        grads["shared_experts.gate_up_proj"] = torch.cat([mlp.gate_proj.weight.grad,
                                                          mlp.up_proj.weight.grad])
        grads["shared_experts.down_proj"] = mlp.down_proj.weight.grad
    if getattr(block, "shared_expert_gate", None) is not None:
        grads["shared_experts.gate"] = block.shared_expert_gate.weight.grad
    return grads


def train_step(model, x, seed: int = 3):
    """One forward with labels and router logits, and its backward. `seed`: Mixtral's jitter
    noise draws the same numbers in both models."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, labels=x, output_router_logits=True)
    out.loss.backward()
    return out


def grad_mismatches(model, ref, names, local_expert_ids=None) -> list[str]:
    """Every gradient of the replaced model against the unmodified one's (expert gradients
    restricted to `local_expert_ids` when given)."""
    fails = []
    expected = outside(ref, names)
    actual = outside(model, names)
    for name in names:
        block, new = ref.get_submodule(name), model.get_submodule(name)
        for key, grad in moe_grads_expected(block).items():
            if key.startswith("experts.") and local_expert_ids is not None:
                grad = grad[list(local_expert_ids)]
            expected[f"{name}.moe.{key}"] = grad
        actual.update({f"{name}.moe.{k}": p for k, p in new.moe.named_parameters()})
    if actual.keys() != expected.keys():
        return [f"parameters differ: {sorted(actual.keys() ^ expected.keys())}"]
    for key, p in actual.items():
        e = expected[key]
        e = e.grad if isinstance(e, torch.nn.Parameter) else e
        if p.grad is None or e is None:
            fails.append(f"{key}: gradient {p.grad is not None} vs expected {e is not None}")
            continue
        err = (p.grad - e).abs().max().item()
        if not err <= RTOL * e.abs().max().item():
            fails.append(f"{key}: max error {err:.3g} against max |grad| "
                         f"{e.abs().max().item():.3g}")
    return fails


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_same_loss_aux_loss_and_gradients(family):
    # output_router_logits=True in training: transformers' load-balancing loss (Mixtral, Qwen)
    # from the replaced blocks' logits, in the loss and in every gradient; Mixtral with its
    # training-time jitter noise
    ref = make_model(family)
    model = copy.deepcopy(ref)
    names = [r.name for r in ep_moe.replace_moe_blocks(model)]
    x = prompt(2, 12, batch=2)
    expected, out = train_step(ref, x), train_step(model, x)
    rel_close(out.loss.detach(), expected.loss.detach())
    if family != "deepseek_v3":  # DeepSeek-V3's head adds no aux loss
        assert expected.aux_loss is not None and out.aux_loss.requires_grad
        rel_close(out.aux_loss.detach(), expected.aux_loss.detach())
    check_router_logits(router_logits_of(out), router_logits_of(expected))
    assert grad_mismatches(model, ref, names) == []


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])  # gated shared expert; fp32 router
def test_save_pretrained_from_pretrained(family, tmp_path):
    make_model(family).save_pretrained(tmp_path)
    load = transformers.AutoModelForCausalLM.from_pretrained
    ref, model = load(tmp_path).eval(), load(tmp_path).eval()
    ep_moe.replace_moe_blocks(model)
    x = prompt(4, 7)
    with torch.no_grad():
        rel_close(model(x).logits, ref(x).logits)
    assert torch.equal(greedy(model, x, 3), greedy(ref, x, 3))

    # bf16: as close to the fp32 model as transformers' own bf16 model is. DeepSeek-V3's router
    # weight stays fp32 (transformers 5.25 loads it in fp32, 5.17 in bf16: the layer keeps
    # exactly the values the model holds)
    ref16, model16 = load(tmp_path, dtype=torch.bfloat16), load(tmp_path, dtype=torch.bfloat16)
    replaced = ep_moe.replace_moe_blocks(model16)
    for r in replaced:
        moe, gate = model16.get_submodule(r.name).moe, ref16.get_submodule(r.name).gate
        assert moe.experts.gate_up_proj.dtype == torch.bfloat16
        assert moe.router.weight.dtype == (torch.float32 if family == "deepseek_v3"
                                           else torch.bfloat16)
        assert torch.equal(moe.router.weight.float(), gate.weight.float())
    with torch.no_grad():
        truth, hf16, ours16 = ref(x).logits, ref16(x).logits, model16(x).logits
    bound = 1.5 * relative_error(hf16, truth)  # measured 0.011-0.015, ours as much
    assert relative_error(ours16, truth) < bound


def test_blocks_and_their_experts_leave_the_model():
    ref = make_model("mixtral")
    names = moe_block_names(ref)
    blocks = [weakref.ref(ref.get_submodule(n)) for n in names]
    storage = [ref.get_submodule(n).experts.down_proj.data_ptr() for n in names]
    rng = torch.get_rng_state()
    replaced = ep_moe.replace_moe_blocks(ref, expert_impl="per_expert", aux_loss_coef=0.01)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    gc.collect()
    assert all(b() is None for b in blocks)  # nothing keeps a replaced block alive
    for r, ptr in zip(replaced, storage):
        moe = ref.get_submodule(r.name).moe
        # one process: the layer took the block's expert tensors themselves, not a copy
        assert moe.experts.down_proj.data_ptr() == ptr
        assert (moe.config.expert_impl, moe.config.aux_loss_coef) == ("per_expert", 0.01)
        assert r.config == moe.config


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        ep_moe.replace_moe_blocks("mixtral")
    with pytest.raises(ValueError, match=r"model \(Linear\) holds no sparse-MoE block.*"
                                         r"MixtralSparseMoeBlock"):
        ep_moe.replace_moe_blocks(torch.nn.Linear(D, D))
    model = make_model("qwen3")
    block = model.get_submodule(moe_block_names(model)[0])
    with pytest.raises(ValueError, match="model is itself a Qwen3MoeSparseMoeBlock.*from_hf"):
        ep_moe.replace_moe_blocks(block)
    with pytest.raises(TypeError, match="process_group must be None or a .*ProcessGroup, got int"):
        ep_moe.replace_moe_blocks(model, process_group=2)
    with pytest.raises(ValueError, match=r"\['top_k'\] are read from the block"):
        ep_moe.replace_moe_blocks(model, top_k=1)
    with pytest.raises(TypeError, match=r"\['topk'\] are not MoEConfig fields"):
        ep_moe.replace_moe_blocks(model, topk=1)
    with pytest.raises(ValueError, match="placement must be"):  # MoEConfig's own validation
        ep_moe.replace_moe_blocks(model, placement="random")
    assert moe_block_names(model)  # a rejected call replaces nothing
    ep_moe.replace_moe_blocks(model)
    with pytest.raises(ValueError, match="replaced already"):
        ep_moe.replace_moe_blocks(model)


# --------------------------------------------------------------------------------------------
# Experts over 2 gloo ranks
# --------------------------------------------------------------------------------------------

def mismatch(what: str, actual, expected, rtol=RTOL) -> list[str]:
    """`rel_close` as a message list (a rank reports rather than raises, so that the other
    rank is not left waiting in a collective)."""
    try:
        if expected is None or actual is None:
            assert actual is None and expected is None, "one of the two is None"
        elif isinstance(expected, tuple):
            assert isinstance(actual, tuple) and len(actual) == len(expected), "lengths differ"
            for a, e in zip(actual, expected):
                rel_close(a, e, rtol)
        else:
            rel_close(actual, expected, rtol)
    except AssertionError as err:
        return [f"{what}: {str(err).splitlines()[0]}"]
    return []


def _expert_parallel_on_rank(families) -> dict:
    """On each rank: the same model (same seed), its experts sharded over the world; this rank's
    own prompt and batch against the unmodified model on them. {family: [mismatches]}."""
    import torch.distributed as dist

    rank, W = dist.get_rank(), dist.get_world_size()
    results = {}
    for family in families:
        fails = []
        ref = make_model(family)
        model = copy.deepcopy(ref)
        replaced = ep_moe.replace_moe_blocks(model, process_group=dist.group.WORLD)
        names = [r.name for r in replaced]
        mine = tuple(range(rank * E // W, (rank + 1) * E // W))  # linear placement
        for r in replaced:
            shape = tuple(model.get_submodule(r.name).moe.experts.gate_up_proj.shape)
            if r.local_expert_ids != mine or shape != (E // W, 2 * I, D):
                fails.append(f"{r.name}: experts {r.local_expert_ids} of shape {shape}")
        if any(p.shape[0] == E and p.ndim == 3 for p in model.parameters()):
            fails.append("a parameter still holds all the experts")

        # generation in lockstep: prompts of different lengths and different numbers of new
        # tokens; synced_gpus keeps the rank that finishes first running forwards
        x = prompt(10 + rank, 4 + 3 * rank)
        new_tokens = 5 - 2 * rank
        tokens = greedy(model, x, new_tokens, synced_gpus=True)
        if not torch.equal(tokens, greedy(ref, x, new_tokens)):
            fails.append(f"generated {tokens.tolist()} != {greedy(ref, x, new_tokens).tolist()}")
        with torch.no_grad():
            out, expected = model(x, output_router_logits=True), ref(x, output_router_logits=True)
        fails += mismatch("logits", out.logits, expected.logits)
        fails += mismatch("router_logits", router_logits_of(out), router_logits_of(expected))

        # a training step on this rank's own batch
        batch = prompt(20 + rank, 6 + rank, batch=2)
        out, expected = train_step(model, batch), train_step(ref, batch)
        fails += mismatch("loss", out.loss.detach(), expected.loss.detach())
        aux = getattr(expected, "aux_loss", None)
        fails += mismatch("aux_loss", None if aux is None else out.aux_loss.detach(),
                          None if aux is None else aux.detach())
        # an expert's gradient gathers every rank's tokens routed to it: the sum of the
        # unmodified model's over the ranks' batches; all else is this rank's own
        for name in names:
            for p in ref.get_submodule(name).experts.parameters():
                dist.all_reduce(p.grad)
        fails += grad_mismatches(model, ref, names, local_expert_ids=mine)
        results[family] = fails
    return results


@pytest.mark.distributed
def test_expert_parallel_two_ranks():
    from dist_utils import spawn_group

    # the two with shared experts, one with a softmax router and transformers' aux loss, one
    # with DeepSeek-V3's fp32 sigmoid router and groups (each MoE forward is a collective
    # under TRITON_INTERPRET: the other two would double the time)
    per_rank = spawn_group(_expert_parallel_on_rank, 2, (("qwen2", "deepseek_v3"),),
                           timeout=300)
    fails = [f"rank {r} {family}: {msg}" for r, results in enumerate(per_rank)
             for family, msgs in results.items() for msg in msgs]
    assert not fails, "\n".join(fails)


# --------------------------------------------------------------------------------------------
# A real shape in bf16 on one GPU
# --------------------------------------------------------------------------------------------

def qwen3_30b_a3b_two_layers():
    """Qwen3-MoE-30B-A3B's shapes cut to 2 layers: D=2048, I=768, E=128, K=8, 32 query and 4
    key/value heads of 128, V=151936; 1.9e9 parameters (3.7 GB in bf16, 7.4 GB in fp32)."""
    return transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
        max_position_embeddings=4096, tie_word_embeddings=False)


def greedy_agreement(a, b) -> float:
    """Share of positions where two (B, S, V) logits pick the same token."""
    return (a.argmax(-1) == b.argmax(-1)).double().mean().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_real_shape_on_gpu():
    """bf16 against the unmodified bf16 model, both judged against the fp32 model on the same
    weights. Random weights make many near-ties (152k logits of similar size, 128 router
    scores a token): one bf16 rounding in either model can tip one, and a generation that
    picked another token goes on from other text. So the generations are compared token by
    token on the same text: both bf16 models read both greedy generations in one forward, and
    ours must pick the fp32 model's token as often as transformers' bf16 model does."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        truth = transformers.AutoModelForCausalLM.from_config(qwen3_30b_a3b_two_layers())
    truth.eval()  # fp32: what both bf16 models approximate
    ref = copy.deepcopy(truth).to(torch.bfloat16)
    model = copy.deepcopy(ref)
    expert_bytes = model.model.layers[0].mlp.experts.gate_up_proj.nbytes

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    replaced = ep_moe.replace_moe_blocks(model)
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - before
    assert [r.name for r in replaced] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert grown < expert_bytes / 10, grown  # the layers took the blocks' tensors: no copy

    S = 32  # prompt length and new tokens
    x = torch.randint(0, 151936, (4, S), generator=torch.Generator().manual_seed(1)).cuda()
    kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=S, min_new_tokens=S,
                  do_sample=False, pad_token_id=0)
    text = torch.cat([model.generate(x, **kwargs), ref.generate(x, **kwargs)])  # (8, 2S)
    with torch.no_grad():
        logits32, hf16, ours16 = (m(text).logits.float() for m in (truth, ref, model))
    hf_err = relative_error(hf16, logits32)
    our_err = relative_error(ours16, logits32)
    # as close to the fp32 model as transformers' bf16 model is (a CPU stand-in with D=1024,
    # E=64, V=16000: 0.021 both)
    assert our_err < 1.5 * hf_err, (our_err, hf_err)
    generated = slice(S - 1, 2 * S - 1)  # the logits that chose the new tokens
    hf_agree = greedy_agreement(hf16[:, generated], logits32[:, generated])
    our_agree = greedy_agreement(ours16[:, generated], logits32[:, generated])
    # 256 choices: near-ties tip either way (CPU stand-in: 0.930 ours, 0.926 transformers', and
    # 0.965 with each other); a wrong layer agrees at chance, ~0
    assert our_agree > hf_agree - 0.06, (our_agree, hf_agree)
    assert greedy_agreement(ours16[:, generated], hf16[:, generated]) > 0.9
