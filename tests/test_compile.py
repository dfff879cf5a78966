"""`torch.compile(layer, fullgraph=True)` runs the plan eager runs: the Triton kernels appear in
the traced graph as custom ops (Inductor calls them, never traces through them), and the
compiled layer matches eager, gradients included.

Traced here with the `aot_eager` backend (CPU, the kernels under the interpreter): the graph is
what Inductor would receive. Speed, compiled against eager on a GPU, is `launch/bench_layer.py`'s.
"""

from __future__ import annotations

import pytest
import torch

from ep_moe import MoE, MoEConfig

from conftest import DEVICE, needs_triton

pytestmark = needs_triton


def compile_recording_ops(module):
    """(compiled module, set of the ep_moe custom ops in the graphs dynamo traced)."""
    seen: set = set()
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            target = getattr(node.target, "_name", None) or str(node.target)
            if node.op == "call_function" and "ep_moe" in target:
                seen.add(target.split("::")[-1].split(".")[0])
        return aot_eager(gm, example_inputs)

    return torch.compile(module, fullgraph=True, backend=backend), seen


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_inference_graph_calls_the_eager_kernels():
    torch.manual_seed(0)
    layer = MoE(MoEConfig.tiny(), device=DEVICE, dtype=torch.bfloat16).eval()
    x = torch.randn(37, 16, dtype=torch.bfloat16, device=DEVICE)
    with torch.no_grad():
        plan = layer.plan(x)
        eager = layer(x)
        compiled_layer, ops = compile_recording_ops(layer)
        compiled = compiled_layer(x)
    assert (plan.router_topk, plan.experts) == ("triton", "triton"), plan
    # the router's top-k, then the sort, both GEMMs and the slot reduction in one op
    assert {"softmax_topk", "triton_partials"} <= ops, ops
    # the same kernels on the same inputs: equal up to the order Inductor may give elementwise
    # ops around them (none here reorder a sum), so within one bf16 rounding
    assert rel(compiled, eager) < 2.0**-8


@pytest.mark.parametrize("losses", [
    {},                                              # inference-style routing
    {"aux_loss_coef": 0.01, "z_loss_coef": 1e-3},    # training losses read the counts
])
def test_training_graph_calls_the_eager_kernels(losses):
    """bf16 (torch's grouped GEMM traces in bf16 only): the router's top-k, the sort, the
    gated activation and the combine are the eager kernels, forward and backward."""
    torch.manual_seed(0)
    layer = MoE(MoEConfig.tiny(dense_max_rows=0, **losses), device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(37, 16, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    assert layer.plan(x).experts == "grouped_mm"
    eager = layer(x)
    eager.float().sum().backward()
    eager_grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad(set_to_none=True)
    compiled_layer, ops = compile_recording_ops(layer)
    compiled = compiled_layer(x)
    compiled.float().sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    assert {"softmax_topk", "sort_by_expert", "gated_activation", "fused_mul_sum"} <= ops, ops
    assert rel(compiled, eager) < 2.0**-8
    for got, want in zip(grads, eager_grads):
        assert rel(got, want) < 2.0**-7  # the backward's sums may round once more


def test_dense_path_compiles():
    """The dense path (batched GEMMs, no sort; asked for: the plan never picks it in training)
    traces too, backward included."""
    torch.manual_seed(0)
    layer = MoE(MoEConfig.tiny(expert_impl="dense"), device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    assert layer.plan(x).experts == "dense"
    eager = layer(x)
    compiled_layer, ops = compile_recording_ops(layer)
    compiled = compiled_layer(x)
    assert "sort_by_expert" not in ops and "fused_mul_sum" in ops, ops
    assert rel(compiled, eager) < 2.0**-8
