"""Row gather up to a device count (ep_moe/kernels/gather.py): real rows copied exactly, rows
past the count untouched, bad indices reading nothing. Triton under TRITON_INTERPRET=1 on CPU
(as in CI) and natively on a GPU."""

import pytest
import torch

import ep_moe.kernels.gather as gather_module
from ep_moe.kernels.gather import gather_rows

from conftest import DEVICE, TRITON_RUNS, needs_triton


def poison_new_empty(monkeypatch, value):
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda t, *size, **kw: new_empty(t, *size, **kw).fill_(value))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,P,count", [
    (9, 129, 20, 13),    # odd D; count inside P: a tail to leave alone
    (5, 4100, 7, 7),     # D above one block: several column passes; count = P
    (3, 8, 6, 0),        # nothing real
])
def test_gather_rows(dtype, N, D, P, count, monkeypatch):
    g = torch.Generator().manual_seed(N + D)
    x = torch.randn(N, D, generator=g).to(DEVICE, dtype)
    index = torch.randint(0, N, (P,), generator=g).to(DEVICE)
    poison_new_empty(monkeypatch, 7.0)
    out = gather_rows(x, index, torch.tensor([count], device=DEVICE))
    monkeypatch.undo()
    assert out.shape == (P, D) and out.dtype == dtype
    assert torch.equal(out[:count], x[index[:count]])
    assert (out[count:] == 7.0).all()  # past the count: never written


@needs_triton
def test_bad_index_reads_nothing():
    x = torch.randn(4, 16, device=DEVICE)
    index = torch.tensor([1, -1, 4, 10**9, 3], device=DEVICE, dtype=torch.int64)
    out = gather_rows(x, index, torch.tensor([5], device=DEVICE, dtype=torch.int32))
    assert torch.equal(out[[0, 4]], x[[1, 3]])
    assert (out[1:4] == 0).all()


@needs_triton
@pytest.mark.parametrize("layout", [
    "x column-major",    # x.stride(1) != 1: the kernel reads rows of unit stride
    "x a column slice",  # rows of x further apart (stride D + 5) than the output's (D)
    "index strided",     # every other element of a longer index tensor
])
def test_gather_rows_strided_inputs(layout):
    N, D, P, count = 6, 40, 9, 7
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g).to(DEVICE)
    index = torch.randint(0, N, (P,), generator=g).to(DEVICE)
    if layout == "x column-major":
        x = x.t().contiguous().t()
    elif layout == "x a column slice":
        x = torch.cat([x, torch.randn(N, 5, generator=g).to(DEVICE)], dim=1)[:, :D]
    else:
        index = torch.stack([index, torch.randint(0, N, (P,), generator=g).to(DEVICE)], 1)[:, 0]
    out = gather_rows(x, index, torch.tensor([count], device=DEVICE))
    assert torch.equal(out[:count], x[index[:count]])


def test_torch_fallback(monkeypatch):
    monkeypatch.setattr(gather_module, "use_triton", lambda t: False)
    x, index = torch.randn(6, 5), torch.tensor([5, 0, 2])
    assert torch.equal(gather_rows(x, index, torch.tensor([2])), x[index])


def test_torch_fallback_bad_index_gives_zeros(monkeypatch):
    # gather_rows' contract holds on every path: an index outside [0, N) gives a row of zeros
    # (as the kernel does, test_bad_index_reads_nothing), not some other token's row
    monkeypatch.setattr(gather_module, "use_triton", lambda t: False)
    x = torch.randn(4, 16)
    index = torch.tensor([1, -1, 4, 3])
    out = gather_rows(x, index, torch.tensor([4]))
    assert torch.equal(out[[0, 3]], x[[1, 3]])
    assert (out[1:3] == 0).all()


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_no_source_rows_gives_zeros(impl, monkeypatch):
    # N = 0 (a rank that received nothing): every index is out of range, every real row 0
    if impl == "torch":
        monkeypatch.setattr(gather_module, "use_triton", lambda t: False)
    elif not TRITON_RUNS:
        pytest.skip("needs TRITON_INTERPRET=1 on CPU, or a GPU")
    x = torch.randn(0, 8, device=DEVICE)
    out = gather_rows(x, torch.tensor([0, 2, -1], device=DEVICE), torch.tensor([3], device=DEVICE))
    assert out.shape == (3, 8) and (out == 0).all()


@pytest.mark.parametrize("args,match", [
    ((torch.randn(4), torch.zeros(2, dtype=torch.int64), torch.tensor([1])), "x must be"),
    ((torch.randn(4, 2).double(), torch.zeros(2, dtype=torch.int64), torch.tensor([1])),
     "x must be"),
    ((torch.randn(4, 2), torch.zeros(2), torch.tensor([1])), "index must be"),
    ((torch.randn(4, 2), torch.zeros(2, dtype=torch.int64), torch.tensor([1, 2])), "count"),
    ((torch.randn(4, 2), torch.zeros(2, dtype=torch.int64), torch.tensor([1.0])), "count"),
    ((torch.randn(4, 2), torch.zeros(2, dtype=torch.int64, device="meta"), torch.tensor([1])),
     "device"),
    ((torch.randn(4, 2), torch.zeros(2, dtype=torch.int64), torch.tensor([1], device="meta")),
     "device"),  # the count too is read on x's device
])
def test_validation(args, match):
    with pytest.raises(ValueError, match=match):
        gather_rows(*args)
