"""The fixed-size exchange over NVLink (`MoEConfig.exchange = "nvlink"`), for inference on CUDA.

Every rank holds one buffer of torch symmetric memory, mapped into every other rank's address
space: a region for the rows it receives and one for the partials that come home. The send
kernel (`push_send_rows`) stores each row straight into its expert rank's region, and the slot
reduction (`fused_mul_sum_rows_split`, through a table of the home ranks' addresses) stores
each partial straight into its home rank's. So no send buffer is filled, no padding row's
token or partial travels, and no NCCL kernel holds SMs beside the experts. Barriers (the
symmetric memory's signal pads) mark where every rank's stores have landed.

The regions are laid out as the collective's buffers: chunk i of a pipeline holds W * C_i rows
at row W * (C_0 + ... + C_{i-1}), rank w's at w * C_i within it. So the expert side and the
home sums read what the all-to-all would have brought (the partials' kernel may round its
sums in another order: the harness found the outputs within 1.4e-8 of the collective's).

Reuse: a forward starts with a barrier, which every rank reaches only once its previous
forward has read its regions.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

# barrier channels: the start, then one per chunk for the rows (on the send stream) and one per
# chunk for the partials (on the return stream); barriers in flight at once need their own
START_CHANNEL = 0


def rows_channel(chunk: int) -> int:
    return 1 + 2 * chunk


def partials_channel(chunk: int) -> int:
    return 2 + 2 * chunk


class PeerBuffers:
    """One rank's symmetric buffer and its views of every rank's.

    rows: the rows of each region (W * max_tokens_per_rank); width: a packed send row's
    elements of `row_dtype` (`packed_row`: FP8 rows are bytes); D: a partial row's, of
    `partial_dtype` (the layer's). Allocating is a collective: every rank of `group` builds its
    PeerBuffers in the same forward."""

    def __init__(self, group: ProcessGroup, device: torch.device, row_dtype: torch.dtype,
                 partial_dtype: torch.dtype, rows: int, width: int, D: int):
        import torch.distributed._symmetric_memory as symm_mem  # CUDA builds only

        name = group.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older torch
            symm_mem.enable_symm_mem_for_group(name)
        self.key = (device, row_dtype, partial_dtype, rows, width, D)
        self.rows, self.width, self.D = rows, width, D
        self.row_dtype, self.partial_dtype = row_dtype, partial_dtype
        # one byte buffer: the rows' region, then the partials' (16-byte aligned: a packed
        # row is a whole number of 16 bytes)
        self._recv_bytes = rows * width * row_dtype.itemsize
        nbytes = self._recv_bytes + rows * D * partial_dtype.itemsize
        local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        local.zero_()  # padding rows' tokens are never sent: keep them finite from the start
        self.handle = symm_mem.rendezvous(local, name)
        self.rank, self.world_size = self.handle.rank, self.handle.world_size
        self._buffers = [local if w == self.rank else
                         self.handle.get_buffer(w, (nbytes,), torch.uint8, 0)
                         for w in range(self.world_size)]
        self._views: dict = {}
        self._tables: dict = {}

    def recv(self, rank: int, row: int, count: int) -> torch.Tensor:
        """(count, width) view of `rank`'s received-rows region from `row`."""
        return self._view(rank, 0, self.width, self.row_dtype, row, count)

    def back(self, rank: int, row: int, count: int) -> torch.Tensor:
        """(count, D) view of `rank`'s returned-partials region from `row`."""
        return self._view(rank, self._recv_bytes, self.D, self.partial_dtype, row, count)

    def outputs(self, region: str, row: int, count: int) -> tuple[list, torch.Tensor]:
        """Every rank's (count, width or D) view at `row` of `region` ("recv" or "back"), and
        the (W,) int64 table of their addresses on this device (built once per place, on the
        first forward: a CUDA graph captured later reuses it)."""
        key = (region, row, count)
        if key not in self._tables:
            view = self.recv if region == "recv" else self.back
            views = [view(w, row, count) for w in range(self.world_size)]
            table = torch.tensor([v.data_ptr() for v in views], dtype=torch.int64,
                                 device=self.key[0])
            self._tables[key] = (views, table)
        return self._tables[key]

    def _view(self, rank, start, width, dtype, row, count):
        """start: the region's first byte."""
        key = (rank, start, row, count)
        if key not in self._views:  # the same few views every forward: no host cost after
            region = self._buffers[rank][start:start + self.rows * width * dtype.itemsize]
            self._views[key] = region.view(dtype).view(self.rows, width)[row:row + count]
        return self._views[key]

    def barrier(self, channel: int) -> None:
        """On the current stream: wait until every rank's stream reaches this barrier."""
        self.handle.barrier(channel=channel)


def check_peer_device(x: torch.Tensor, group: ProcessGroup) -> None:
    # raised on every rank alike: the config and the tensors' device type are the same on all
    if x.device.type != "cuda":
        raise ValueError(f"MoEConfig.exchange='nvlink' needs CUDA tensors (symmetric memory "
                         f"over NVLink), got x on {x.device}; use exchange='collective'")
    backend = str(dist.get_backend(group))
    if "nccl" not in backend:
        raise ValueError(f"MoEConfig.exchange='nvlink' needs a group of CUDA ranks (nccl), got "
                         f"backend {backend!r}")


def peer_exchange_supported(group: ProcessGroup) -> bool:
    """Whether every rank of `group` can map the others' memory for the exchange over NVLink:
    NCCL ranks on CUDA devices of one host, with torch symmetric memory. A collective
    (`all_gather_object`): call it on every rank; every rank gets the same answer."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401  (CUDA builds of torch)
        symmetric = True
    except ImportError:
        symmetric = False
    able = symmetric and torch.cuda.is_available() and "nccl" in str(dist.get_backend(group))
    facts = [None] * dist.get_world_size(group)
    dist.all_gather_object(facts, (socket.gethostname(), able), group=group)
    return all(ok for _, ok in facts) and len({host for host, _ in facts}) == 1
