"""Small GPU-only facts the code relies on (or chose not to), printed; run through the device
tool: `python launch/gpu_checks.py`.

- The router keeps `F.linear(x.float(), w.float())` for its fp32 logits: a bf16 GEMM with fp32
  output (`torch.mm(..., out_dtype=torch.float32)`, torch >= 2.8 on CUDA) skips the upcast
  copies but came out 6x further from float64 on an H200 (7.4e-5 against 1.3e-5), enough to
  flip near-tied top-k choices, and has no backward on torch 2.11.
"""

import torch

x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
w = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
ref = x.double() @ w.double().t()
fast = torch.mm(x, w.t(), out_dtype=torch.float32)
slow = torch.nn.functional.linear(x.float(), w.float())
print("mm out_dtype fp32:", fast.dtype, "max err vs fp64", (fast.double() - ref).abs().max().item(),
      "upcast path", (slow.double() - ref).abs().max().item())
xg = x.clone().requires_grad_()
try:
    torch.mm(xg, w.t(), out_dtype=torch.float32).sum().backward()
    print("mm out_dtype backward: ok", xg.grad.dtype)
except Exception as exc:  # noqa: BLE001
    print("mm out_dtype backward: fails:", type(exc).__name__, str(exc)[:120])
