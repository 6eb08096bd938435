"""Probe: how fast the paged KV cache can be read at all, by access pattern, against SDPA on
contiguous KV in the same run (sm_90+, Gluon). A persistent grid (one program per SM) streams
every page of issue 8's decode inputs by TMA into a shared-memory ring whose consumer only
releases the slots (no math): units of HB KV heads per page (a [16, HB x 128] box: HB = 1 is the
decode kernels' one-head slice, 8 the whole 32 KB page), in chunks of pages so every SM has
about four units. Prints each pattern's time as SDPA time / probe time.

    python bench/page_read_probe.py
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.triton import attention_ws as ws  # noqa: E402
from backends.triton.attention_common import _sm_count  # noqa: E402
from bench.attention import Timer, copy_bandwidth, decode_inputs, decode_peers  # noqa: E402

_tma_load = ws._tma_load


@gluon.jit
def _idle(x):
    pass


@gluon.jit
def _prod(
    k_desc,
    v_desc,
    k_smem,
    v_smem,
    ready,
    empty,
    bt_ptr,
    seq_lens_ptr,
    stride_bt,
    num_items,
    groups,
    chunks,
    chunk,
    PAGE: gl.constexpr,
    COLS: gl.constexpr,
    BOXC: gl.constexpr,
    STAGES: gl.constexpr,
    HND: gl.constexpr,
):
    NB: gl.constexpr = COLS // BOXC
    j = 0
    for w in range(gl.program_id(0), num_items, gl.num_programs(0)):
        seq = w // (groups * chunks)
        rem = w % (groups * chunks)
        col0 = (rem % groups) * COLS
        ch = rem // groups
        pages = gl.cdiv(gl.load(seq_lens_ptr + seq), PAGE)
        lo = ch * chunk
        hi = gl.minimum(pages, lo + chunk)
        row = bt_ptr + seq.to(gl.int64) * stride_bt
        for i in range(lo, hi):
            page = gl.load(row + i)
            slot = j % STAGES
            mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)
            bar = ready.index(slot)
            mbarrier.expect(bar, 2 * NB * k_desc.block_type.nbytes)
            if HND > 0:  # [blocks, HND heads, PAGE, COLS]: one head's page is PAGE whole rows
                r0 = (page * HND + col0 // COLS) * PAGE
                c0 = 0
            else:  # [blocks, PAGE, heads, head_dim]: one head's page is PAGE row slices
                r0 = page * PAGE
                c0 = col0
            for c in gl.static_range(NB):
                _tma_load(k_desc, [r0, c0 + c * BOXC], bar, k_smem.index(slot * NB + c))
                _tma_load(v_desc, [r0, c0 + c * BOXC], bar, v_smem.index(slot * NB + c))
            j += 1


@gluon.jit
def _cons(
    ready,
    empty,
    seq_lens_ptr,
    num_items,
    groups,
    chunks,
    chunk,
    PAGE: gl.constexpr,
    STAGES: gl.constexpr,
):
    j = 0
    for w in range(gl.program_id(0), num_items, gl.num_programs(0)):
        seq = w // (groups * chunks)
        ch = (w % (groups * chunks)) // groups
        pages = gl.cdiv(gl.load(seq_lens_ptr + seq), PAGE)
        lo = ch * chunk
        hi = gl.minimum(pages, lo + chunk)
        for _i in range(lo, hi):
            slot = j % STAGES
            mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
            mbarrier.arrive(empty.index(slot))
            j += 1


@gluon.jit
def _stream_kernel(
    k_desc,
    v_desc,
    bt_ptr,
    seq_lens_ptr,
    stride_bt,
    num_items,
    groups,
    chunks,
    chunk,
    PAGE: gl.constexpr,
    COLS: gl.constexpr,
    BOXC: gl.constexpr,
    STAGES: gl.constexpr,
    HND: gl.constexpr,
):
    NB: gl.constexpr = COLS // BOXC
    dt: gl.constexpr = k_desc.dtype
    k_smem = gl.allocate_shared_memory(dt, [STAGES * NB, PAGE, BOXC], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dt, [STAGES * NB, PAGE, BOXC], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()
    gl.warp_specialize(
        [
            (_idle, (num_items,)),
            (
                _prod,
                (
                    k_desc,
                    v_desc,
                    k_smem,
                    v_smem,
                    ready,
                    empty,
                    bt_ptr,
                    seq_lens_ptr,
                    stride_bt,
                    num_items,
                    groups,
                    chunks,
                    chunk,
                    PAGE,
                    COLS,
                    BOXC,
                    STAGES,
                    HND,
                ),
            ),
            (_cons, (ready, empty, seq_lens_ptr, num_items, groups, chunks, chunk, PAGE, STAGES)),
        ],
        [1, 1],
        [40, 40],
    )


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def stream(x, hb, boxc, stages, swz, per_sm=4, hnd=None):
    """hnd: the caches laid out [blocks, KV heads, page, head_dim] (one head's page contiguous;
    hb must be 1) instead of the engine's [blocks, page, KV heads, head_dim]."""
    blocks, page, kvh, hd = x.key_cache.shape
    rows, cols = blocks * page, kvh * hd
    caches = (x.key_cache, x.value_cache)
    if hnd is not None:
        if hb != 1:
            raise ValueError("the HND probe reads one KV head a unit (hb 1)")
        rows, cols, caches = blocks * kvh * page, hd, hnd
    lay = gl.NVMMASharedLayout(swizzle_byte_width=swz, element_bitwidth=16, rank=2)
    kd, vd = (
        TensorDescriptor(c.view(rows, cols), [rows, cols], [cols, 1], [page, boxc], lay)
        for c in caches
    )
    b = x.q.shape[0]
    pages = x.block_tables.shape[1]
    groups = kvh // hb
    sms = _sm_count(x.q.device)
    chunk = max(8, math.ceil(b * groups * pages / (sms * per_sm)))
    chunks = math.ceil(pages / chunk)
    items = b * groups * chunks
    grid = min(items, sms)

    def run():
        _stream_kernel[(grid,)](
            kd,
            vd,
            x.block_tables,
            x.seq_lens,
            x.block_tables.stride(0),
            items,
            groups,
            chunks,
            chunk,
            PAGE=page,
            COLS=hb * hd,
            BOXC=boxc,
            STAGES=stages,
            HND=0 if hnd is None else kvh,
            num_warps=4,
        )

    return run, chunk, items


# name: (KV heads per unit, box columns, ring slots, swizzle bytes); about 96-192 KB of ring.
# "hnd": the same one-head units from caches laid out [blocks, KV heads, page, head_dim].
V = {
    "hb1 s12": (1, 128, 12, 128),
    "hnd hb1 s12": (1, 128, 12, 128),
    "hb2 s8": (2, 128, 8, 128),
    "hb4 s6": (4, 128, 6, 128),
    "hb8 s3": (8, 128, 3, 128),
    "hb8 s3 b256": (8, 256, 3, 0),
    "hb2 s8 b256": (2, 256, 8, 0),
}


SHAPES = "64x512,64x4096,256x1024,16x8192,16x32768,4x32768"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=SHAPES, help="batch x context, comma-separated")
    p.add_argument("--variants", default=",".join(V), help=f"of: {', '.join(V)}")
    args = p.parse_args()
    variants = {name: V[name] for name in args.variants.split(",")}
    dev = torch.device("cuda")
    timer = Timer(dev, 3, 20)
    bw = copy_bandwidth(dev, timer)
    print(f"copy {bw / 1e12:.3f} TB/s")
    off = {k: "off" for k in ("fa2", "fa2_paged", "flex", "xformers", "flash_attn")}
    for b, ctx in parse_shapes(args.shapes):
        x = decode_inputs(b, ctx, dev)
        kv = 2 * x.key_cache.numel() * 2
        sdpa = timer.graph(decode_peers(x, off, False)["sdpa"])
        line = f"{b} x {ctx}: sdpa {sdpa * 1e3:.1f} us ({kv / (sdpa * 1e-3) / bw:.3f} of copy)"
        hnd = None
        if any(name.startswith("hnd") for name in variants):
            hnd = tuple(c.permute(0, 2, 1, 3).contiguous() for c in (x.key_cache, x.value_cache))
        for name, (hb, boxc, st, swz) in variants.items():
            try:
                h = hnd if name.startswith("hnd") else None
                fn, chunk, items = stream(x, hb, boxc, st, swz, hnd=h)
                ms = timer.graph(fn)
                line += f", {name} {ms * 1e3:.1f} ({sdpa / ms:.3f})"
            except Exception as e:
                line += f", {name} ERR {type(e).__name__}: {str(e)[:80]}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
