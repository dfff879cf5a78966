"""The examples run: imported from their files (examples/ is not a package), at tiny size,
single process, and the expert-parallel one on 2 gloo ranks too."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from dist_utils import spawn_group

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--hidden", "32", "--intermediate", "48", "--experts", "4", "--vocab", "64",
        "--batch", "2", "--seq", "6"]


def test_mixtral_block_main():
    example = load_example("mixtral_block")
    loss = example.main(TINY)
    # at init the logits have variance ~1/3 (unit-RMS features, head weights U(+-1/sqrt(D))),
    # so the loss sits near ln V + 1/6, far from a broken model's 0, inf or nan
    assert abs(loss - math.log(64)) < 0.5


def test_mixtral_block_gradients():
    example = load_example("mixtral_block")
    args = example.parse_args(TINY)
    torch.manual_seed(0)
    model = example.TinyLM(example.make_config(args), args.vocab, args.heads)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    example.train_step(model, tokens)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # every weight, router and experts too, is used
    # the block keeps the (B, S, D) shape and is causal: a later token cannot change earlier ones
    x = torch.randn(1, 5, args.hidden)
    with torch.no_grad():
        y = model.block(x)
        x2 = x.clone()
        x2[0, -1] += 1.0
        y2 = model.block(x2)
    assert y.shape == x.shape
    torch.testing.assert_close(y2[0, :-1], y[0, :-1])  # a leak would be O(1)
    assert not torch.equal(y2[0, -1], y[0, -1])


HF_TINY = ["--hidden", "32", "--intermediate", "16", "--experts", "8", "--vocab", "64",
           "--tokens", "5", "--new-tokens", "3"]
# fp32 on both sides, the same routing: summation order only (see test_replace_moe_blocks)
HF_RTOL = 1e-5


@pytest.mark.parametrize("block", ["deepseek_v3", "qwen2", "qwen3", "mixtral"])
def test_hf_expert_parallel_single_process(block):
    pytest.importorskip("transformers")
    result = load_example("hf_expert_parallel").main(HF_TINY + ["--block", block])
    assert result["logits_error"] < HF_RTOL and result["same_tokens"], result


def _hf_example_on_rank(block):
    import torch.distributed as dist
    return load_example("hf_expert_parallel").main(HF_TINY + ["--block", block],
                                                   group=dist.group.WORLD)


@pytest.mark.distributed
@pytest.mark.parametrize("block", ["deepseek_v3", "qwen2"])  # the two with shared experts
def test_hf_expert_parallel_two_ranks(block):
    pytest.importorskip("transformers")
    results = spawn_group(_hf_example_on_rank, 2, (block,), timeout=240)
    assert all(r["logits_error"] < HF_RTOL and r["same_tokens"] for r in results), results
