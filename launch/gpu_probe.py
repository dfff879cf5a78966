"""What this GPU's torch takes: versions, and which dtypes torch's grouped GEMM accepts."""

import torch
import torch.nn.functional as F
import triton

from ep_moe.experts import _grouped_mm

print(f"torch {torch.__version__} triton {triton.__version__} "
      f"device {torch.cuda.get_device_name()} x{torch.cuda.device_count()}")
print("grouped_mm:", getattr(_grouped_mm, "__name__", None), "public:", hasattr(F, "grouped_mm"))
x = torch.randn(40, 64, device="cuda")
w = torch.randn(3, 32, 64, device="cuda")
offs = torch.tensor([8, 24, 40], dtype=torch.int32, device="cuda")
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    try:
        y = _grouped_mm(x.to(dtype), w.to(dtype).transpose(-2, -1), offs=offs)
        ref = torch.cat([x[a:b] @ w[e].t() for e, (a, b) in enumerate([(0, 8), (8, 24), (24, 40)])])
        err = ((y.float() - ref).norm() / ref.norm()).item()
        print(f"grouped_mm {dtype}: ok rel_err={err:.2e}")
    except Exception as e:  # report, don't fail: this decides the dtype table in experts.py
        print(f"grouped_mm {dtype}: unsupported ({type(e).__name__}: {str(e)[:120]})")
