"""Paged attention on ROCm: the shared Triton kernels (`backends.triton.attention`) launched with
AMD tuning.

The kernels and their math are written once for both vendors; this file only chooses tiles
(`backends.rocm.tuning`) and compile options. Decode batches go to the shared split-KV decode
kernel with an AMD `DecodeConfig`; other batches to the general kernel with AMD tiles, the AMD-only
options on HIP, and dot input precision "ieee" (Triton's HIP backend accepts "tf32" on gfx942
only, and for 16-bit operands the setting changes nothing). Under the interpreter every dot runs
in fp32 (Triton issue #11584), as in the shared launcher.
"""

from __future__ import annotations

import torch
import triton

from backends.rocm.tuning import (
    amd_decode_config,
    attention_tuning,
    compile_options,
    target_backend,
)
from backends.triton import attention as shared
from backends.triton.quant import interpreting


def attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    kv_scale: float | None = None,
    warp_size: int = 64,
    amd_tiles: bool | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """The `Backend.attention` contract, tiled for `warp_size`-lane wavefronts. Returns
    [num_tokens, num_heads, head_dim] in query's dtype; rows past query_start_loc[-1] are zeros.

    amd_tiles None: AMD tiles on a GPU, the shared interpreter tiles (large, for speed) under
    TRITON_INTERPRET=1; True forces the AMD tiles there too (tests check them that way)."""
    if amd_tiles is None:
        amd_tiles = not interpreting()
    args = (query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
            sliding_window, soft_cap, kv_scale)  # fmt: skip
    num_tokens, num_heads, head_dim = query.shape if query.dim() == 3 else (0, 0, 0)
    hints = dict(max_query_len=max_query_len, max_seq_len=max_seq_len)
    num_seqs = seq_lens.shape[0] if seq_lens.dim() else -1
    if shared.takes_decode_path(num_tokens, num_seqs, max_query_len):
        config = amd_decode_config(warp_size, head_dim, query.dtype) if amd_tiles else None
        return shared.decode_attention(*args, config=config, **hints)
    shared._check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                  sliding_window, soft_cap, kv_scale, max_query_len, max_seq_len)  # fmt: skip
    if not amd_tiles:
        return shared.attention(*args, **hints)
    return _general(*args, warp_size)


def _general(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
             sliding_window, soft_cap, kv_scale, warp_size) -> torch.Tensor:  # fmt: skip
    head_dim = query.shape[2]
    group = query.shape[1] // key_cache.shape[2]
    fp32 = query.dtype == torch.float32
    head_dim_p2 = max(16, triton.next_power_of_2(max(head_dim, 1)))
    tune = attention_tuning(warp_size, fp32, head_dim_p2, group)
    options = compile_options(tune, target_backend(query.device.type))
    return shared._launch_general(query, key_cache, value_cache, block_tables, seq_lens,
                                  query_start_loc, scale, sliding_window, soft_cap, kv_scale,
                                  tune.block_m, tune.block_n, options)  # fmt: skip
