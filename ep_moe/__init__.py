"""ep_moe: an expert-parallel Mixture-of-Experts layer with a fused Triton combine.

Notation, used in names and shape comments everywhere:
    T tokens on this rank · D hidden size · I expert intermediate size · E global experts ·
    e local experts · K top-k · W ranks in the expert-parallel group ·
    R rows received after dispatch · P (row, slot) pairs routed to local experts.
"""

from .config import MoEConfig
from .hf import HFMoEBlock, ReplacedBlock, replace_moe_blocks
from .kernels import moe_fused_mul_sum
from .layer import MoE
from .placement import ExpertPlacement
from .router import Router, RouterOutput

__all__ = ["MoE", "MoEConfig", "ExpertPlacement", "Router", "RouterOutput",
           "moe_fused_mul_sum", "replace_moe_blocks", "ReplacedBlock", "HFMoEBlock"]
