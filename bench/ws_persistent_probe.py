"""Probe: the persistent warp-specialized decode kernel (backends/triton/attention_ws_persistent.py)
at its launch shape and two other ring depths, against SDPA on contiguous KV, the Triton decode
kernel and whatever `attention` routes to, at the wide-batch and long-context shapes of issue 8's
sweep, after a correctness check against an fp32 reference (ragged lengths). Graph replays, L2
flushed (bench/attention.py's timer and inputs).

    python bench/ws_persistent_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.triton import attention_ws as ws  # noqa: E402
from backends.triton import attention_ws_persistent as wsp  # noqa: E402
from bench.attention import (  # noqa: E402
    HEAD_DIM,
    NUM_HEADS,
    NUM_KV_HEADS,
    Timer,
    copy_bandwidth,
    decode_inputs,
    decode_peers,
    ours_decode,
)

VARIANTS = {  # persistent_decode keyword arguments (the default: the engine's launch shape)
    "default": dict(),
    "s8": dict(stages=8),
    "s16": dict(stages=16),
}
CHECKED = ("default",)


def reference(x) -> torch.Tensor:
    b, ctx = x.k.shape[:2]
    q = x.q.float().view(b, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_DIM)
    k, v = x.k.float().transpose(1, 2), x.v.float().transpose(1, 2)
    mask = (torch.arange(ctx, device=x.q.device)[None, :] < x.seq_lens[:, None]).view(b, 1, 1, ctx)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=x.scale)
    return out.reshape(b, NUM_HEADS, HEAD_DIM)


def persistent_call(x, kw: dict):
    args = (x.q, x.key_cache, x.value_cache, x.block_tables, x.seq_lens, x.scale)
    return lambda: wsp.persistent_decode(*args, **kw)


def main() -> int:
    dev = torch.device("cuda")
    timer = Timer(dev, 3, 20)
    print(f"copy {copy_bandwidth(dev, timer) / 1e12:.3f} TB/s")
    for b, ctx, trim in ((3, 64, 5), (40, 1024, 7), (200, 512, 3), (64, 2048, 0)):
        x = decode_inputs(b, ctx, dev, seed=b + ctx)
        x.seq_lens[::3] -= trim
        ref = reference(x)
        for name in CHECKED:
            y = persistent_call(x, VARIANTS[name])()
            err = float((y.float() - ref).abs().max())
            print(f"check {b} x {ctx} {name}: max err {err:.2e}", flush=True)
            if err > 1e-2:
                return 1
    off = {k: "off" for k in ("fa2", "fa2_paged", "flex", "xformers", "flash_attn")}
    shapes = ((16, 512), (16, 1024), (16, 4096), (16, 8192), (16, 32768), (64, 512), (64, 1024),
              (64, 4096), (64, 32768), (256, 512), (256, 1024), (256, 8192))  # fmt: skip
    for b, ctx in shapes:
        x = decode_inputs(b, ctx, dev)
        sdpa = timer.graph(decode_peers(x, off, False)["sdpa"])
        ws.ENABLED = False
        triton_ms = timer.graph(ours_decode(x))
        ws.ENABLED = True
        routed = timer.graph(ours_decode(x))
        line = f"{b} x {ctx}: sdpa {sdpa * 1e3:.2f} us, triton {triton_ms * 1e3:.2f}"
        line += f" ({sdpa / triton_ms:.3f}), routed {routed * 1e3:.2f} ({sdpa / routed:.3f})"
        for name, kw in VARIANTS.items():
            ms = timer.graph(persistent_call(x, kw))
            line += f", {name} {ms * 1e3:.2f} ({sdpa / ms:.3f})"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
