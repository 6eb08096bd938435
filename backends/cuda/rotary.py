"""Rotary position embedding on CUDA: the reference math, with shape checks only.

Code in this file may assume CUDA. `backends.cpu.rotary.rotary` also range-checks `positions`,
which reads them back to the host; that sync is not allowed inside a captured graph, so this
version leaves out-of-range positions to the device's index check.
"""

from __future__ import annotations

import torch

from backends.cpu import rotary as reference


def rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference rotation on device tensors, without the host-side positions range check."""
    return reference.rotary(positions, query, key, cos_sin_cache, is_neox, check_range=False)
