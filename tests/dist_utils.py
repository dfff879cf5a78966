"""Helpers for the expert-parallel tests: spawn a gloo group once, run many cases inside it.

Process start-up (importing torch and triton) dominates the cost of a distributed test on a
small CPU machine, so each world size spawns ONE group of processes that loops over a list of
`Case`s and reports, per case and per rank, the list of mismatches it found.

Every case compares each rank of a sharded `MoE` against the single-process `MoE` holding the
same full weights, on the concatenation of every rank's tokens: outputs, input gradients,
expert-weight gradients (against the matching slice) and replicated-weight gradients (summed
over the ranks). Tokens are tagged with their source rank (channel 0 holds rank + 1) and every
token gets its own random upstream gradient, so a row sent to the wrong rank, or combined
into the wrong token, shows up in the outputs and in the gradients.

Letters as in the package: T tokens on a rank, D hidden size, E experts, K top-k, W ranks.
"""

from __future__ import annotations

import inspect
import os
import queue as queue_lib
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ep_moe
from ep_moe.dispatch import chunk_bounds
from ep_moe.kernels.common import use_triton

from conftest import emulate_blockwise_mm

# Per-dtype tolerances, relative to the largest magnitude of the expected tensor.
# fp32: both layers run the same fp32 GEMMs on the same rows; only the order of a token's K
#   slot sums (split into per-rank partials) and the batch the router GEMM sees differ
#   (observed: at most 3e-7).
# bf16: a rank rounds its partial sum to bf16 before the home rank adds the partials, one
#   rounding (2^-8 relative) per rank the token visits; the gradients add a few more
#   (observed: at most 7e-3).
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 3e-2}

# gloo collectives give up after this long, so a desync fails a case instead of hanging it
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Spawning
# --------------------------------------------------------------------------------------------

def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out,
           backend: str = "gloo") -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)  # W processes share a couple of cores
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU a rank
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=COLLECTIVE_TIMEOUT)
        try:
            out.put((rank, "ok", fn(*args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        out.put((rank, "error", traceback.format_exc()))


def spawn_group(fn: Callable, world_size: int, args: tuple = (), timeout: float = 300.0,
                backend: str = "gloo") -> list:
    """Run `fn(*args)` on `world_size` spawned ranks (gloo; or nccl, rank r on GPU r); return
    the per-rank results.

    Raises RuntimeError with every failing rank's traceback if a rank raised, died or did not
    finish within `timeout` seconds (its processes are then killed).
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, out, backend),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        # drain the queue before joining: a child cannot exit while its message is unread
        while len(results) + len(errors) < world_size:
            if time.monotonic() > deadline:
                break
            try:
                rank, status, payload = out.get(timeout=1.0)
            except queue_lib.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in results and r not in errors]
                for r in dead:
                    errors[r] = f"process exited with code {procs[r].exitcode}"
                continue
            (results if status == "ok" else errors)[rank] = payload
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    missing = [r for r in range(world_size) if r not in results and r not in errors]
    for r in missing:
        errors[r] = f"no result within {timeout:.0f} s (killed)"
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors))
        raise RuntimeError(f"{len(errors)} of {world_size} ranks failed:\n{report}")
    return [results[r] for r in range(world_size)]


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One check, run by every rank of the group.

    kind: "match" (sharded vs single-process layer), "aux_loss" (training losses under EP),
        "fp8" (FP8 experts, inference: sharded vs single-process layer),
        "too_few_experts" (W > E must raise), "config_mismatch" (rank 1 uses another top_k),
        "over_capacity" (more tokens than max_tokens_per_rank must raise), "one_over_capacity"
        (rank 0 alone over it must raise before any collective).
    tokens: T of each rank of the expert-parallel group.
    config: overrides of `MoEConfig.tiny`.
    hot_expert: give this expert a router logit that wins for every token.
    load: build the sharded layer from a different seed, then `load_full_state_dict`.
    ep_size: split the world into groups of this many consecutive ranks (default: one group).
    """

    name: str
    kind: str = "match"
    tokens: tuple = ()
    config: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    hot_expert: Optional[int] = None
    load: bool = False
    ep_size: Optional[int] = None

    def moe_config(self) -> ep_moe.MoEConfig:
        # init_std 0.2: O(1) router logits (no near-ties) and O(0.1) outputs
        # the automatic dense path off unless a case asks for it: a few tokens would always
        # take it, and the sorted paths are what most cases exercise
        return ep_moe.MoEConfig.tiny(init_std=0.2, **{"dense_max_rows": 0, **self.config})


def expected_local_experts(E: int, W: int, placement: str) -> list[list[int]]:
    """Global expert ids of each rank, derived independently of `ExpertPlacement`."""
    if placement == "round_robin":
        return [[g for g in range(E) if g % W == r] for r in range(W)]
    out, start = [], 0
    for r in range(W):
        n = E // W + (1 if r < E % W else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def make_inputs(tokens, D: int, dtype: torch.dtype, seed: int):
    """Every rank's tokens and upstream gradients, identical on every rank.

    Returns x (sum T, D) with channel 0 = source rank + 1, and grad_out (sum T, D).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(tokens), D, generator=gen)
    x[:, 0] = torch.repeat_interleave(torch.arange(1, len(tokens) + 1.0),
                                      torch.tensor(tokens, dtype=torch.int64))
    grad_out = torch.randn(sum(tokens), D, generator=gen)
    return x.to(dtype), grad_out.to(dtype)


def _compare(what: str, actual, expected, dtype) -> list[str]:
    if actual is None or expected is None:
        if actual is None and expected is None:
            return []
        return [f"{what}: actual is {type(actual).__name__}, expected {type(expected).__name__}"]
    if actual.shape != expected.shape:
        return [f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"]
    if actual.dtype != expected.dtype:
        return [f"{what}: dtype {actual.dtype} != expected {expected.dtype}"]
    if actual.numel() == 0:
        return []
    a, e = actual.double(), expected.double()
    if not torch.isfinite(a).all():
        return [f"{what}: non-finite values"]
    scale = max(e.abs().max().item(), 1e-12)
    err = (a - e).abs().max().item()
    if err > TOLERANCES[dtype] * scale:
        worst = (a - e).abs().flatten().argmax().item()
        return [f"{what}: max abs error {err:.3g} > {TOLERANCES[dtype]:g} * scale {scale:.3g} "
                f"(worst flat index {worst}: {a.flatten()[worst].item():.6g} vs "
                f"{e.flatten()[worst].item():.6g})"]
    return []


def _grad(p: Optional[torch.Tensor]):
    if p is None:
        return None
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _train_step(layer, x, grad_out):
    """Forward + backward from zeroed grads; returns y, x.grad, {name: param grad}."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad_out)
    return y.detach(), x.grad, {n: _grad(p) for n, p in layer.named_parameters()}


def _build(case: Case, group, dtype, seed: int):
    cfg = case.moe_config()
    torch.manual_seed(seed)
    # the single-process layer takes every rank's tokens: no per-rank capacity
    full = ep_moe.MoE(cfg.replace(max_tokens_per_rank=None, dispatch_chunks=1), dtype=dtype)
    if case.hot_expert is not None:
        with torch.no_grad():  # channel 0 is rank + 1 >= 1: expert `hot` wins every token
            full.router.weight[:, 0] = 0.0
            full.router.weight[case.hot_expert, 0] = 8.0
    if cfg.use_correction_bias:
        with torch.no_grad():  # a non-zero selection bias, so it must reach every rank
            full.router.e_score_correction_bias.normal_(0.0, 0.05)
    torch.manual_seed(seed if not case.load else seed + 1)
    sharded = ep_moe.MoE(cfg, process_group=group, dtype=dtype)
    if case.load or case.hot_expert is not None or cfg.use_correction_bias:
        sharded.load_full_state_dict(full.state_dict())
    return cfg, full, sharded


def _check_layout(cfg, full, sharded, rank: int, W: int) -> list[str]:
    fails = []
    local = expected_local_experts(cfg.num_experts, W, cfg.placement)[rank]
    if sharded.local_expert_ids != local:
        fails.append(f"local_expert_ids {sharded.local_expert_ids} != {local}")
    emap = torch.full((cfg.num_experts,), -1, dtype=torch.int32)
    emap[local] = torch.arange(len(local), dtype=torch.int32)
    if sharded.expert_map.dtype != torch.int32 or not torch.equal(sharded.expert_map, emap):
        fails.append(f"expert_map {sharded.expert_map.tolist()} != {emap.tolist()}")
    full_sd, sd = full.state_dict(), sharded.state_dict()
    if sorted(sd) != sorted(full_sd):
        fails.append(f"state_dict keys {sorted(sd)} != single-process {sorted(full_sd)}")
    for name, ref in full_sd.items():
        if name not in sd:
            continue
        want = ref[local] if name.startswith("experts.") else ref
        if sd[name].shape != want.shape or sd[name].dtype != want.dtype:
            fails.append(f"state_dict[{name}] is {tuple(sd[name].shape)} {sd[name].dtype}, "
                         f"expected {tuple(want.shape)} {want.dtype}")
        elif not torch.equal(sd[name], want):
            fails.append(f"state_dict[{name}] differs from the single-process slice")
    return fails


class _HostRead(RuntimeError):
    pass


def _check_fixed_exchange(layer, x, y_expected, W: int) -> list[str]:
    """A fixed-size exchange: every rank receives W * C rows, and the forward reads nothing
    back to the host (each way a tensor reaches the host raises while it runs)."""
    C, fails = layer.config.max_tokens_per_rank, []
    with torch.no_grad():
        route = layer.router(x)
        sent = layer.dispatcher.dispatch(x, route.topk_ids, route.topk_weights)
    if sent.x.shape[0] != W * C or sent.pairs_exact:
        fails.append(f"fixed exchange: received {sent.x.shape[0]} rows (pairs_exact="
                     f"{sent.pairs_exact}), expected {W * C} padded rows")

    def host_read(*args, **kwargs):
        raise _HostRead("a tensor was read back to the host")

    saved = {name: getattr(torch.Tensor, name)
             for name in ("tolist", "item", "cpu", "__bool__", "__int__", "__index__")}
    all_to_all, calls = dist.all_to_all_single, []
    overlapped = []
    fused_forward, partials = layer.experts.fused_forward, layer.experts.triton_partials

    def recording(*args, **kwargs):  # the chunks' GEMMs run beside exchanges: no persistent
        overlapped.append(kwargs["overlapped"])
        return fused_forward(*args, **kwargs)

    def recording_partials(*args, **kwargs):
        overlapped.append(inspect.signature(partials).bind(*args, **kwargs)
                          .arguments["overlapped"])
        return partials(*args, **kwargs)

    def counted(*args, **kwargs):
        calls.append(1)
        return all_to_all(*args, **kwargs)

    # per-expert GEMMs read their row counts back by design; every other path reads nothing
    with torch.no_grad():
        plan = layer.plan(x)
    patched = saved if plan.experts != "per_expert" else {}
    try:
        for name in patched:
            setattr(torch.Tensor, name, host_read)
        dist.all_to_all_single = counted
        layer.experts.fused_forward = recording
        layer.experts.triton_partials = recording_partials
        with torch.no_grad():
            y = layer(x)
    except _HostRead:
        fails.append(f"fixed exchange read a tensor back to the host:\n{traceback.format_exc()}")
        return fails
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        dist.all_to_all_single = all_to_all
        del layer.experts.fused_forward, layer.experts.triton_partials  # the methods again
    if not torch.equal(y, y_expected):
        fails.append("fixed exchange: the forward without host reads differs")
    # rows out and partials back per chunk, no split sizes (all-gather: none)
    cfg = layer.config
    chunks = len(chunk_bounds(cfg.max_tokens_per_rank, plan.chunks))
    expected = 2 * chunks if cfg.dispatcher == "all_to_all" else 0
    if len(calls) != expected:
        fails.append(f"fixed exchange: {len(calls)} all-to-alls, expected {expected}")
    # the Triton path where the plan says so (never for grouped_mm / per_expert, nor on a CPU
    # without the interpreter), beside the exchanges exactly when they are pipelined
    fused = plan.experts in ("triton", "triton_fp8")
    if fused != (cfg.expert_impl in ("auto", "triton") and use_triton(x)):
        fails.append(f"fixed exchange: plan {plan} on {x.device}")
    if (fused and not overlapped) or set(overlapped) - {plan.chunks > 1}:
        fails.append(f"fixed exchange in {plan.chunks} chunks: fused_forward got "
                     f"overlapped={overlapped}")
    return fails


def _check_host_counts(layer, x) -> list[str]:
    """Exact exchanges: the experts get each local expert's pair count on the host from the
    exchange (the split sizes' read), equal to the sort's device counts, and read nothing
    back themselves (with expert_impl="per_expert", which needs the counts, too)."""
    forward, seen, fails = layer.experts.forward, [], []
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "cpu")}

    def host_read(*args, **kwargs):
        raise _HostRead("a tensor was read back to the host")

    def recording(x, num_tokens_per_expert, offsets=None, counts=None, path="grouped_mm"):
        seen.append((saved["tolist"](num_tokens_per_expert), counts))
        for name in saved:
            setattr(torch.Tensor, name, host_read)
        try:
            return forward(x, num_tokens_per_expert, offsets, counts, path)
        finally:
            for name, fn in saved.items():
                setattr(torch.Tensor, name, fn)

    layer.experts.forward = recording
    try:
        layer(x)  # x needs a gradient: the training path, which calls the experts' forward
    except _HostRead:
        fails.append(f"the experts read a tensor back to the host:\n{traceback.format_exc()}")
    finally:
        del layer.experts.forward  # the method again
    if not seen and layer.plan(x).experts != "dense":  # the dense path skips these
        fails.append("the experts' forward never ran")
    for device_counts, counts in seen:
        if counts is None or list(counts) != device_counts:
            fails.append(f"experts got host counts {counts}, the sort counted {device_counts}")
    return fails


def check_match(case: Case, group, seed: int) -> list[str]:
    """Sharded layer vs single-process layer on every rank's tokens at once."""
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    dtype = case.dtype
    cfg, full, sharded = _build(case, group, dtype, seed)
    fails = _check_layout(cfg, full, sharded, rank, W)

    x_all, g_all = make_inputs(case.tokens, cfg.hidden_size, dtype, seed)
    if case.hot_expert is not None:
        with torch.no_grad():
            top1 = full.router(x_all).topk_ids[:, 0]
        if not (top1 == case.hot_expert).all():
            fails.append(f"hot expert {case.hot_expert} is not every token's first choice")
    start = sum(case.tokens[:rank])
    rows = slice(start, start + case.tokens[rank])
    y_full, gx_full, grads_full = _train_step(full, x_all, g_all)
    y, gx, grads = _train_step(sharded, x_all[rows], g_all[rows])
    fails += _compare("output", y, y_full[rows], dtype)
    fails += _compare("input grad", gx, gx_full[rows], dtype)
    for name, g in grads.items():
        if name.startswith("experts."):
            fails += _compare(f"{name}.grad", g, grads_full[name][sharded.local_expert_ids],
                              dtype)
        else:  # replicated: each rank holds its tokens' share of the gradient
            total = g.float().clone()  # fp32 sum over ranks, as a data-parallel all-reduce
            dist.all_reduce(total, group=group)
            fails += _compare(f"{name}.grad (sum over ranks)", total.to(dtype),
                              grads_full[name], dtype)

    # run to run: same inputs, bitwise the same outputs and gradients
    y2, gx2, grads2 = _train_step(sharded, x_all[rows], g_all[rows])
    second = {"output": (y, y2), "input grad": (gx, gx2),
              **{f"{n}.grad": (grads[n], grads2[n]) for n in grads}}
    for what, (first, again) in second.items():
        if not torch.equal(first, again):
            fails.append(f"{what}: second forward/backward is not bitwise equal to the first")

    # inference: no autograd, so the Triton grouped GEMMs run on every rank (and on no rank
    # for a rank that received nothing); against the single-process no-grad forward
    with torch.no_grad():
        y_inf = sharded(x_all[rows])
        y_inf_full = full(x_all)
    fails += _compare("no-grad output", y_inf, y_inf_full[rows], dtype)
    fails += _compare("no-grad output vs training forward", y_inf, y.detach(), dtype)
    if cfg.max_tokens_per_rank is not None:
        fails += _check_fixed_exchange(sharded, x_all[rows], y_inf, W)
    else:
        fails += _check_host_counts(sharded, x_all[rows].detach().requires_grad_())

    # frozen experts (training adapters elsewhere): gradients reach the tokens and the router
    # through both exchanges with no expert-weight gradient in the graph
    sharded.experts.requires_grad_(False)
    try:
        y_frozen, gx_frozen, grads_frozen = _train_step(sharded, x_all[rows], g_all[rows])
        if any(p.grad is not None for p in sharded.experts.parameters()):
            fails.append("frozen experts got a gradient")
    finally:
        sharded.experts.requires_grad_(True)
    fails += _compare("frozen-experts output", y_frozen, y_full[rows], dtype)
    fails += _compare("frozen-experts input grad", gx_frozen, gx_full[rows], dtype)
    router_grad = grads_frozen["router.weight"].float().clone()
    dist.all_reduce(router_grad, group=group)
    fails += _compare("frozen-experts router.weight.grad (sum over ranks)",
                      router_grad.to(dtype), grads_full["router.weight"], dtype)

    # inputs that need no gradient (x of a frozen embedding, say): the router's gradient still
    # travels through the rows' exchange (in the routing weights); with the router frozen too
    # that exchange records nothing, and the partials' exchange alone brings the experts'
    # gradients back
    for frozen_router in (False, True):
        what = "x without grad" + (", router frozen" if frozen_router else "")
        sharded.router.requires_grad_(not frozen_router)
        try:
            sharded.zero_grad(set_to_none=True)
            sharded(x_all[rows].detach()).backward(g_all[rows])
            got = {n: _grad(p) for n, p in sharded.named_parameters()}
        finally:
            sharded.router.requires_grad_(True)
        for name, g in got.items():
            if name.startswith("experts."):
                fails += _compare(f"{what}: {name}.grad", g,
                                  grads_full[name][sharded.local_expert_ids], dtype)
            elif name == "router.weight" and not frozen_router:
                total = g.float().clone()
                dist.all_reduce(total, group=group)
                fails += _compare(f"{what}: router.weight.grad (sum over ranks)",
                                  total.to(dtype), grads_full[name], dtype)

    gathered = sharded.full_state_dict()
    for name, ref in full.state_dict().items():
        if name not in gathered or not torch.equal(gathered[name], ref):
            fails.append(f"full_state_dict()[{name}] differs from the single-process weights")
    if sorted(gathered) != sorted(full.state_dict()):
        fails.append(f"full_state_dict() keys {sorted(gathered)}")
    return fails


def check_aux_loss(case: Case, group, seed: int) -> list[str]:
    """Training losses under EP: each rank's aux loss is the single-process loss of its own
    tokens, and its gradient flows; summed over ranks, the gradients equal the single-process
    layer's run chunk by chunk (the aux loss is per batch, so not on the concatenation)."""
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    cfg, full, sharded = _build(case, group, case.dtype, seed)
    x_all, g_all = make_inputs(case.tokens, cfg.hidden_size, case.dtype, seed)
    starts = [sum(case.tokens[:r]) for r in range(W)]
    chunks = [slice(s, s + n) for s, n in zip(starts, case.tokens)]
    fails = []

    x = x_all[chunks[rank]].clone().requires_grad_()
    y, route = sharded(x, return_router_output=True)
    y.backward(g_all[chunks[rank]])
    if case.tokens[rank] and route.aux_loss is None:
        fails.append("no aux_loss in training mode with non-zero coefficients")
    x_ref = x_all[chunks[rank]].clone().requires_grad_()
    y_ref, route_ref = full(x_ref, return_router_output=True)
    if (route.aux_loss is None) != (route_ref.aux_loss is None):
        fails.append(f"aux_loss is {route.aux_loss}, single-process {route_ref.aux_loss}")
    elif route.aux_loss is not None:
        fails += _compare("aux_loss", route.aux_loss, route_ref.aux_loss, case.dtype)
    fails += _compare("output", y.detach(), y_ref.detach(), case.dtype)

    # reference gradients: d<y, g>/dw without the aux loss (eval mode), plus d aux/dw from the
    # router alone, i.e. what attaching the aux loss to y must add
    full.zero_grad(set_to_none=True)
    gx_full = None
    for r, chunk in enumerate(chunks):
        xr = x_all[chunk].clone().requires_grad_()
        full.eval()
        full(xr).backward(g_all[chunk])
        full.train()
        aux = full.router(xr).aux_loss
        if aux is not None:
            aux.backward()
        if r == rank:
            gx_full = xr.grad
    fails += _compare("input grad", x.grad, gx_full, case.dtype)
    for name, p in sharded.named_parameters():
        ref = _grad(dict(full.named_parameters())[name])
        if name.startswith("experts."):
            fails += _compare(f"{name}.grad", _grad(p), ref[sharded.local_expert_ids],
                              case.dtype)
        else:
            total = _grad(p).clone()
            dist.all_reduce(total, group=group)
            fails += _compare(f"{name}.grad (sum over ranks)", total, ref, case.dtype)
    return fails


def check_fp8(case: Case, group, seed: int) -> list[str]:
    """FP8 experts under expert parallelism (inference only): the sharded layer, loaded from
    the single-process FP8 layer's state dict (each rank slices its experts and their block
    scales), against that layer on every rank's tokens. An all-to-all sends the rows as e4m3
    with their scales (as bytes: gloo takes no float8); `full_state_dict` gathers the e4m3
    weights back; a forward that records autograd raises the same error on every rank."""
    rank, W = dist.get_rank(group), dist.get_world_size(group)
    dtype, cfg = case.dtype, case.moe_config()
    per_expert = cfg.expert_impl == "per_expert"
    if per_expert:  # cuBLAS's block-scaled product runs on Hopper only: emulated here
        emulate_blockwise_mm(setattr)
    torch.manual_seed(seed)
    full = ep_moe.MoE(cfg.replace(max_tokens_per_rank=None, dispatch_chunks=1), dtype=dtype)
    if cfg.use_correction_bias:
        with torch.no_grad():
            full.router.e_score_correction_bias.normal_(0.0, 0.05)
    torch.manual_seed(seed + 1)  # other weights until loaded
    sharded = ep_moe.MoE(cfg, process_group=group, dtype=dtype)
    sharded.load_full_state_dict(full.state_dict())
    fails = _check_layout(cfg, full, sharded, rank, W)

    x_all, _ = make_inputs(case.tokens, cfg.hidden_size, dtype, seed)
    start = sum(case.tokens[:rank])
    x = x_all[start:start + case.tokens[rank]]
    with torch.no_grad():
        y = sharded(x)
        y_full = full(x_all)[start:start + case.tokens[rank]]
        plan = sharded.plan(x)
    fails += _compare("fp8 output", y, y_full, dtype)
    a2a = cfg.dispatcher == "all_to_all"
    if plan.experts != ("per_expert_fp8" if per_expert else "triton_fp8") or \
            plan.fp8_dispatch != a2a:
        fails.append(f"plan {plan}")
    if a2a:  # the rows arrive as e4m3 with their scales (D bytes and D / 128 fp32 a row)
        with torch.no_grad():
            route = sharded.router(x)
            sent = sharded.dispatcher.dispatch(x, route.topk_ids, route.topk_weights, fp8=True)
        if sent.x.dtype != torch.float8_e4m3fn or sent.x_scale is None or \
                tuple(sent.x_scale.shape) != (sent.x.shape[0], cfg.hidden_size // 128):
            fails.append(f"fp8 dispatch received {sent.x.dtype} rows, scales "
                         f"{None if sent.x_scale is None else tuple(sent.x_scale.shape)}")
    if cfg.max_tokens_per_rank is not None:
        fails += _check_fixed_exchange(sharded, x, y, W)
    # the router's weight requires grad: inference only, refused on every rank alike
    fails += _same_error_everywhere(lambda: sharded(x), group,
                                    ("expert_quant='fp8' is inference only",))
    gathered = sharded.full_state_dict()
    for name, ref in full.state_dict().items():
        if name not in gathered or not torch.equal(gathered[name], ref):
            fails.append(f"full_state_dict()[{name}] differs from the single-process weights")
    return fails + _group_still_works(group)


def _same_error_everywhere(build: Callable, group, must_contain: tuple) -> list[str]:
    """`build()` must raise a ValueError with the same message on every rank."""
    try:
        build()
        message = None
    except ValueError as e:
        message = str(e)
    messages = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, message, group=group)
    if message is None:
        return ["no ValueError raised"]
    fails = [f"message lacks {s!r}: {message}" for s in must_contain if s not in message]
    if len(set(messages)) != 1:
        fails.append(f"ranks raised different errors: {messages}")
    return fails


def _group_still_works(group) -> list[str]:
    """After an error: no rank left waiting in a collective, so a fresh one completes."""
    probe = torch.ones(1)
    dist.all_reduce(probe, group=group)
    if probe.item() != dist.get_world_size(group):
        return [f"all_reduce after the error gave {probe.item()}"]
    return []


def check_too_few_experts(case: Case, group, seed: int) -> list[str]:
    cfg = case.moe_config()
    return _same_error_everywhere(lambda: ep_moe.MoE(cfg, process_group=group), group,
                                  ("at least one expert per rank",
                                   f"num_experts={cfg.num_experts}"))


def check_config_mismatch(case: Case, group, seed: int) -> list[str]:
    cfg = case.moe_config()
    if dist.get_rank(group) == 1:
        cfg = cfg.replace(top_k=cfg.top_k + 1)
    fails = _same_error_everywhere(lambda: ep_moe.MoE(cfg, process_group=group), group,
                                   ("differs between the ranks", "top_k"))
    return fails + _group_still_works(group)


def check_over_capacity(case: Case, group, seed: int) -> list[str]:
    """Every rank passes more tokens than `max_tokens_per_rank`: each raises before any
    collective, and the group still works."""
    cfg = case.moe_config()
    layer = ep_moe.MoE(cfg, process_group=group)
    x = torch.randn(cfg.max_tokens_per_rank + 1, cfg.hidden_size)
    fails = _same_error_everywhere(lambda: layer(x), group,
                                   ("max_tokens_per_rank", f"{cfg.max_tokens_per_rank + 1} tokens"))
    return fails + _group_still_works(group)


def check_one_over_capacity(case: Case, group, seed: int) -> list[str]:
    """Rank 0 alone passes too many tokens: it must raise before any collective (the others
    call nothing; had it entered one, it would wait there until the collective timeout)."""
    cfg, fails = case.moe_config(), []
    layer = ep_moe.MoE(cfg, process_group=group)
    if dist.get_rank(group) == 0:
        try:
            layer(torch.randn(cfg.max_tokens_per_rank + 1, cfg.hidden_size))
            fails.append("no ValueError raised")
        except ValueError as e:
            if "max_tokens_per_rank" not in str(e):
                fails.append(f"message lacks max_tokens_per_rank: {e}")
    return fails + _group_still_works(group)


_CHECKS = {"match": check_match, "aux_loss": check_aux_loss, "fp8": check_fp8,
           "too_few_experts": check_too_few_experts, "config_mismatch": check_config_mismatch,
           "over_capacity": check_over_capacity, "one_over_capacity": check_one_over_capacity}


def _ep_group(ep_size: Optional[int]):
    """The expert-parallel group of this rank: the world, or consecutive blocks of ranks.
    (`new_group` is collective over the world: every rank creates every block.)"""
    W = dist.get_world_size()
    if ep_size is None or ep_size == W:
        return dist.group.WORLD
    mine = None
    for start in range(0, W, ep_size):
        g = dist.new_group(list(range(start, start + ep_size)), timeout=COLLECTIVE_TIMEOUT)
        if start <= dist.get_rank() < start + ep_size:
            mine = g
    return mine


def run_cases(cases: list) -> dict:
    """Run every case on this rank; returns {case name: [mismatch messages]} (empty: passed).

    An exception in a case may leave the ranks out of step, so the remaining cases are
    reported as not run rather than attempted.
    """
    results, broken = {}, None
    for i, case in enumerate(cases):
        if broken is not None:
            results[case.name] = [f"not run: case {broken!r} raised before it"]
            continue
        try:
            group = _ep_group(case.ep_size)
            results[case.name] = _CHECKS[case.kind](case, group, seed=1000 + i)
        except Exception:  # noqa: BLE001 - reported per case
            results[case.name] = [f"raised:\n{traceback.format_exc()}"]
            broken = case.name
    return results


def failures_by_rank(per_rank: list, name: str) -> str:
    """Readable summary of one case's failures over the ranks ('' when every rank passed)."""
    lines = []
    for rank, results in enumerate(per_rank):
        for msg in results.get(name, [f"case missing from rank {rank}'s results"]):
            lines.append(f"rank {rank}: {msg}")
    return "\n".join(lines)
