"""Attention benchmarks on one GPU, every peer measured in the same run: paged decode as a fraction
of the copy bandwidth measured here, causal varlen prefill in TFLOP/s, and the seed documents'
comparison (naive, SDPA, FA2, xFormers, ours: latency, tokens/s, peak memory).

    python bench/attention.py all --out /tmp/attn          # autotunes + decode + prefill + compare
    python bench/attention.py decode prefill --autotune --out /tmp/attn   # both tables (< 4 min)
    python bench/attention.py decode --autotune             # search the decode tuning table
    python bench/attention.py wide                          # the wide-batch decode table
    python bench/attention.py decode [--batches 1,64 --contexts 4096,32768]
    python bench/attention.py prefill [--autotune]          # --autotune: the prefill table
    python bench/attention.py compare --out /tmp/attn && python bench/plot_attention.py /tmp/attn

Shapes follow the CUDA issue: 32 query / 8 KV heads, head_dim 128, bf16, block_size 16. Timing:
CUDA events around each call, warm-up first, median of --reps; before every timed call a read of
a 512 MiB buffer evicts the inputs from L2 (and hides our Python launch time behind GPU work).
Decode rows also give ours replayed from a CUDA graph (GPU time alone, as the engine runs decode)
and the host time of one eager call, so a launch-bound cell shows as such.
Decode bytes = K and V read + q read + out written. Without CUDA (smoke test under
TRITON_INTERPRET=1) only ours and SDPA run, timed with perf_counter on tiny shapes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from backends.triton import attention as tattn
from backends.triton import attention_ws, attention_ws_persistent

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
BATCHES = (1, 4, 16, 64, 256)
CONTEXTS = (512, 1024, 4096, 8192, 32768)
# FlexAttention compiles per shape (tens of seconds each): by default only the anchors.
FLEX_SHAPES = ((64, 4096), (1, 32768))
AUTOTUNE_SHAPES = ((1, 4096), (1, 32768), (4, 1024), (4, 8192), (16, 512), (16, 1024), (16, 2048),
                   (16, 4096), (16, 8192), (32, 1024), (32, 4096), (64, 512), (64, 1024),
                   (64, 4096), (256, 1024))  # fmt: skip
# Split-model parameters the decode autotune fits (`attention_decode.num_splits`): resident
# programs per SM, the throughput a second one adds, the cost of splitting in tiles.
FIT_PROGRAMS_PER_SM = (1, 2, 3, 4)
FIT_SHARED_GAINS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)
FIT_SPLIT_COSTS = (0.0, 0.5, 1.0, 2.0, 4.0)
# Stages: the K/V loads' addresses come from the block table, so Triton's pipeliner splits the
# stages between the table load and the K/V loads; below 5 the next tile's K/V is issued only
# after the current tile's math (no overlap), from 5 one tile stays in flight during it.
TILE_CONFIGS = (  # (block_n, num_warps, num_stages)
    (32, 4, 3), (32, 2, 7), (64, 4, 3), (64, 4, 5), (64, 2, 5), (64, 8, 5), (128, 4, 3),
    (128, 4, 5), (128, 8, 3), (128, 8, 5),
)  # fmt: skip
PREFILL_SHAPES = ((1, 512), (1, 1024), (1, 2048), (1, 4096), (1, 8192), (8, 1024))
PREFILL_AUTOTUNE_SHAPES = ((1, 1024), (1, 4096), (1, 8192), (8, 1024))
PREFILL_TILE_CONFIGS = (  # (block_m rows, block_n, num_warps, num_stages)
    (64, 64, 4, 3), (64, 64, 4, 5), (128, 32, 4, 3), (128, 32, 4, 7), (128, 64, 4, 3),
    (128, 64, 8, 3), (128, 64, 8, 5), (128, 128, 8, 3), (128, 128, 8, 5), (256, 32, 8, 3),
)  # fmt: skip
COMPARE_SHAPES = ((1, 512, 64), (1, 2048, 128), (4, 1024, 128), (1, 8192, 128))  # (B, N, D)


# -- timing ------------------------------------------------------------------------------------
class Timer:
    """Median milliseconds of fn() over reps, L2 evicted before each call."""

    def __init__(self, device: torch.device, warmup: int, reps: int) -> None:
        self.device, self.warmup, self.reps = device, warmup, reps
        self.cuda = device.type == "cuda"
        self.flush = (
            torch.ones(128 << 20, dtype=torch.float32, device=device) if self.cuda else None
        )

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]  # fmt: skip
        for start, end in events:
            self.flush.sum()  # a read: L2 ends up holding clean lines of this buffer
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)

    def graph(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of fn captured once in a CUDA graph and replayed (no host work in
        the timed region), L2 evicted before each replay. CUDA only."""
        for _ in range(self.warmup):
            fn()  # compile and allocate outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self(graph.replay)

    def host_us(self, fn: Callable[[], object], calls: int = 20) -> float:
        """Median microseconds the host spends in one call of fn (launches only, no sync)."""
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        if self.cuda:
            torch.cuda.synchronize()
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3)


def peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """MiB allocated by one call of fn above what was allocated before it."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


# -- peers ---------------------------------------------------------------------------------------
def _fa2_arg_names() -> set[str]:
    try:
        return {a.name for a in torch.ops.aten._flash_attention_forward.default._schema.arguments}
    except (AttributeError, RuntimeError):
        return set()


def fa2_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, block_table=None):
    """torch.ops.aten._flash_attention_forward (PyTorch's bundled FlashAttention-2), keyword
    arguments only where this torch's schema has them. q: [T, H, D]; k, v: [T_k, Hkv, D] or
    paged [num_blocks, block_size, Hkv, D] with block_table."""
    kw = {"scale": scale}
    if block_table is not None:
        kw["block_table"] = block_table
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, **kw
    )[0]


def probe_libraries(device: torch.device) -> dict[str, str | None]:
    """None when the library imports and runs a tiny call on this device, else the reason."""
    reasons: dict[str, str | None] = {}
    if device.type != "cuda":
        return {"fa2": "needs CUDA", "fa2_paged": "needs CUDA", "flex": "needs CUDA",
                "xformers": "needs CUDA", "flash_attn": "needs CUDA"}  # fmt: skip
    q = torch.randn(4, 2, 64, dtype=DTYPE, device=device)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    names = _fa2_arg_names()
    try:
        fa2_forward(q, q, q, cu, cu, 4, 4, True, 0.125)
        reasons["fa2"] = None
    except Exception as e:  # noqa: BLE001 - any failure is a reason to print
        reasons["fa2"] = f"aten._flash_attention_forward failed: {type(e).__name__}: {e}"[:160]
    if "block_table" not in names:
        reasons["fa2_paged"] = (
            f"torch {torch.__version__}'s _flash_attention_forward has no block_table"
        )
    else:
        reasons["fa2_paged"] = None  # tried per shape; a failure there is printed
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        reasons["flex"] = None
    except ImportError as e:
        reasons["flex"] = f"torch.nn.attention.flex_attention: {e}"
    try:
        import xformers.ops as xops

        x = torch.randn(1, 4, 2, 64, dtype=DTYPE, device=device)
        xops.memory_efficient_attention(x, x, x)
        reasons["xformers"] = None
    except Exception as e:  # noqa: BLE001
        reasons["xformers"] = f"{type(e).__name__}: {e}"[:160]
    try:
        from flash_attn import flash_attn_with_kvcache

        x = torch.randn(1, 4, 2, 64, dtype=DTYPE, device=device)
        flash_attn_with_kvcache(x[:, :1], x, x)
        reasons["flash_attn"] = None
    except Exception as e:  # noqa: BLE001
        reasons["flash_attn"] = f"{type(e).__name__}: {e}"[:160]
    return reasons


# -- decode --------------------------------------------------------------------------------------
@dataclass
class DecodeInputs:
    q: torch.Tensor  # [B, H, D]
    k: torch.Tensor  # contiguous [B, L, Hkv, D]
    v: torch.Tensor
    key_cache: torch.Tensor  # paged [B * L / 16, 16, Hkv, D], blocks in random order
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [B, L / 16]
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float


def decode_inputs(batch: int, context: int, device: torch.device, seed: int = 0) -> DecodeInputs:
    """The same logical KV twice: contiguous for the peers, paged through a shuffled block table
    for ours (and the correctness check)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, context, NUM_KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, generator=g, device=device, dtype=DTYPE)
    v = torch.randn(shape, generator=g, device=device, dtype=DTYPE)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=g, device=device, dtype=DTYPE)
    pages = context // BLOCK_SIZE
    perm = torch.randperm(batch * pages, generator=g, device=device)
    tables = perm.view(batch, pages).to(torch.int32)
    paged = (batch * pages, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    kc, vc = (
        torch.empty(paged, dtype=DTYPE, device=device),
        torch.empty(paged, dtype=DTYPE, device=device),
    )
    kc[perm] = k.view(paged)  # page j of sequence b -> block tables[b, j]
    vc[perm] = v.view(paged)
    return DecodeInputs(
        q, k, v, kc, vc, tables, torch.full((batch,), context, dtype=torch.int32, device=device),
        torch.arange(batch + 1, dtype=torch.int32, device=device), 1.0 / math.sqrt(HEAD_DIM),
    )  # fmt: skip


def ours_decode(x: DecodeInputs, config: tattn.DecodeConfig | None = None) -> Callable:
    args = (x.q, x.key_cache, x.value_cache, x.block_tables, x.seq_lens, x.query_start_loc, x.scale)
    max_seq_len = x.k.shape[1]
    if config is None:
        return lambda: tattn.attention(*args, max_query_len=1, max_seq_len=max_seq_len)
    return lambda: tattn.decode_attention(*args, max_query_len=1, max_seq_len=max_seq_len,
                                          config=config)  # fmt: skip


def decode_peers(x: DecodeInputs, libs: dict, flex: bool) -> dict[str, Callable]:
    """Each peer on its best layout: GQA folded into query rows (decode needs no causal mask)."""
    b, ctx = x.k.shape[:2]
    group = NUM_HEADS // NUM_KV_HEADS
    peers: dict[str, Callable] = {}
    q_rows = x.q.view(b, NUM_KV_HEADS, group, HEAD_DIM)  # [B, Hkv, group, D]
    kt, vt = x.k.transpose(1, 2), x.v.transpose(1, 2)  # [B, Hkv, L, D] views
    peers["sdpa"] = lambda: F.scaled_dot_product_attention(q_rows, kt, vt, scale=x.scale).view(
        b, NUM_HEADS, HEAD_DIM
    )
    dev = x.q.device
    if libs.get("fa2") is None:
        cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)
        cu_k = cu_q * ctx
        kf, vf = (
            x.k.view(b * ctx, NUM_KV_HEADS, HEAD_DIM),
            x.v.view(b * ctx, NUM_KV_HEADS, HEAD_DIM),
        )
        peers["fa2_varlen"] = lambda: fa2_forward(x.q, kf, vf, cu_q, cu_k, 1, ctx, False, x.scale)
        if libs.get("fa2_paged") is None and ctx % 256 == 0:
            kp = x.k.view(b * ctx // 256, 256, NUM_KV_HEADS, HEAD_DIM)
            vp = x.v.view(b * ctx // 256, 256, NUM_KV_HEADS, HEAD_DIM)
            table = torch.arange(b * ctx // 256, dtype=torch.int32, device=dev).view(b, -1)
            peers["fa2_paged256"] = lambda: fa2_forward(x.q, kp, vp, cu_q, cu_k, 1, ctx, False,
                                                        x.scale, block_table=table)  # fmt: skip
    if flex and libs.get("flex") is None:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = _compiled_flex(flex_attention)
        q4 = x.q.view(b, NUM_HEADS, 1, HEAD_DIM)
        peers["flex"] = lambda: compiled(q4, kt, vt, scale=x.scale, enable_gqa=True).view(
            b, NUM_HEADS, HEAD_DIM
        )
    if libs.get("xformers") is None:
        import xformers.ops as xops

        qx = x.q.view(b, 1, NUM_KV_HEADS, group, HEAD_DIM)
        kx = x.k.view(b, ctx, NUM_KV_HEADS, 1, HEAD_DIM).expand(-1, -1, -1, group, -1)
        vx = x.v.view(b, ctx, NUM_KV_HEADS, 1, HEAD_DIM).expand(-1, -1, -1, group, -1)
        peers["xformers"] = lambda: xops.memory_efficient_attention(qx, kx, vx, scale=x.scale).view(
            b, NUM_HEADS, HEAD_DIM
        )
    if libs.get("flash_attn") is None:
        from flash_attn import flash_attn_with_kvcache

        qf = x.q.view(b, 1, NUM_HEADS, HEAD_DIM)
        peers["flash_attn"] = lambda: flash_attn_with_kvcache(
            qf, x.k, x.v, softmax_scale=x.scale
        ).view(b, NUM_HEADS, HEAD_DIM)
    return peers


_FLEX = {}


def _compiled_flex(flex_attention):
    if "fn" not in _FLEX:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max())


def run_decode(args, device, timer, bw, libs) -> list[dict]:
    rows = []
    cap = args.mem_cap_gb * 2**30
    print(f"\n== decode: {NUM_HEADS}/{NUM_KV_HEADS} heads, head_dim {HEAD_DIM}, bf16, block_size "
          f"{BLOCK_SIZE}; fraction of copy bandwidth {bw / 1e12:.2f} TB/s")  # fmt: skip
    print("ours: eager CUDA-event time and fraction; graph: ours and SDPA replayed from CUDA "
          "graphs (GPU time alone); host: our Python time per eager call")  # fmt: skip
    hdr = (f"{'batch':>5} {'ctx':>6} {'splits':>6} {'ours ms':>8} {'ours':>5} {'graph':>5} "
           f"{'sdpa_g':>6} {'host us':>7}  peers (fraction; err)")  # fmt: skip
    print(hdr)
    sms = tattn._sm_count(device)
    for b in args.batches:
        for ctx in args.contexts:
            kv_bytes = 2 * b * ctx * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
            if 2 * kv_bytes > cap:  # contiguous + paged copies
                print(f"{b:>5} {ctx:>6}  skipped: {2 * kv_bytes / 2**30:.1f} GiB > --mem-cap-gb")
                continue
            x = decode_inputs(b, ctx, device)
            nbytes = kv_bytes + 2 * b * NUM_HEADS * HEAD_DIM * DTYPE.itemsize
            # the launch `attention` picks for this batch (wide-batch and one-wave entries too)
            cfg = tattn.decode_config(HEAD_DIM, DTYPE, device, False, b * NUM_KV_HEADS, ctx)
            ours = ours_decode(x)
            ref = F.scaled_dot_product_attention(
                x.q.view(b, NUM_KV_HEADS, -1, HEAD_DIM).float(),
                x.k.transpose(1, 2).float(), x.v.transpose(1, 2).float(), scale=x.scale,
            ).reshape(b, NUM_HEADS, HEAD_DIM) if b * ctx <= 65536 else None  # fmt: skip
            ms = timer(ours)
            splits = tattn.decode_splits(b, NUM_KV_HEADS, BLOCK_SIZE, ctx // BLOCK_SIZE, cfg,
                                         device, max_seq_len=ctx)  # fmt: skip
            kernel = str(cfg)
            why_not_ws = (
                attention_ws.call_reason(x.q, x.key_cache, x.value_cache, b, None, None, None, 1)
                if device.type == "cuda"
                else "cpu"
            )
            route = attention_ws.route(b * NUM_KV_HEADS, ctx, BLOCK_SIZE, sms)
            if why_not_ws is None and route == "ws":  # a warp-specialized kernel runs this batch
                splits = attention_ws.num_splits(b * NUM_KV_HEADS, ctx, BLOCK_SIZE, sms)
                kernel = f"attention_ws (stages {attention_ws.STAGES})"
            elif why_not_ws is None and route == "persistent":
                splits = 1
                stages = attention_ws_persistent.stages_for(BLOCK_SIZE, HEAD_DIM, 2)
                kernel = f"attention_ws_persistent (stages {stages})"
            row = {"batch": b, "context": ctx, "bytes": nbytes, "splits": splits,
                   "ours_ms": ms, "ours_frac": nbytes / (ms * 1e-3) / bw, "peers": {},
                   "sms": sms, "config": kernel}  # fmt: skip
            out = ours()
            flex = (b, ctx) in args.flex_shapes or args.flex_all
            peers = decode_peers(x, libs, flex and device.type == "cuda")
            base = peers["sdpa"]()
            row["host_us"] = timer.host_us(ours)
            g_ms = sdpa_g_ms = float("nan")
            if device.type == "cuda":
                try:
                    g_ms, sdpa_g_ms = timer.graph(ours), timer.graph(peers["sdpa"])
                except RuntimeError as e:  # a capture failure is a result to print
                    print(f"  {b}x{ctx}: graph capture failed: {str(e)[:80]}")
            row["ours_graph_ms"], row["sdpa_graph_ms"] = g_ms, sdpa_g_ms
            row["ours_graph_frac"] = nbytes / (g_ms * 1e-3) / bw
            row["sdpa_graph_frac"] = nbytes / (sdpa_g_ms * 1e-3) / bw
            row["ours_err"] = max_err(out, base if ref is None else ref)
            cells = []
            if (b, ctx) in args.fp8_shapes:
                # FP8 (e4m3fn) cache, kv_scale 1/64: half the bytes; error vs the bf16 result
                kc8 = (x.key_cache.float() * 64).to(torch.float8_e4m3fn)
                vc8 = (x.value_cache.float() * 64).to(torch.float8_e4m3fn)
                fp8_args = (x.q, kc8, vc8, x.block_tables, x.seq_lens, x.query_start_loc, x.scale)
                fp8 = lambda a=fp8_args, c=ctx: tattn.attention(*a, kv_scale=1 / 64, max_seq_len=c)  # noqa: E731
                fms, fbytes = timer(fp8), kv_bytes // 2 + nbytes - kv_bytes
                fgms = timer.graph(fp8) if device.type == "cuda" else float("nan")
                row["ours_fp8"] = {"ms": fms, "frac": fbytes / (fms * 1e-3) / bw,
                                   "graph_ms": fgms, "graph_frac": fbytes / (fgms * 1e-3) / bw,
                                   "err": max_err(fp8(), base)}  # fmt: skip
                cells.append(f"ours_fp8kv {row['ours_fp8']['frac']:.2f} ({fms:.3f} ms), graph "
                             f"{row['ours_fp8']['graph_frac']:.2f} ({fgms:.3f} ms); "
                             f"{row['ours_fp8']['err']:.1e}")  # fmt: skip
                del kc8, vc8, fp8
            for name, fn in peers.items():
                try:
                    err = max_err(fn(), base if ref is None else ref)
                    pms = timer(fn)
                except Exception as e:  # noqa: BLE001 - a peer failing is a result to print
                    cells.append(f"{name} failed ({type(e).__name__}: {str(e)[:60]})")
                    continue
                row["peers"][name] = {"ms": pms, "frac": nbytes / (pms * 1e-3) / bw, "err": err}
                cells.append(f"{name} {row['peers'][name]['frac']:.2f}; {err:.1e}")
            ok = {n: p for n, p in row["peers"].items() if p["err"] < 0.05}
            best = max(ok, key=lambda n: ok[n]["frac"]) if ok else None
            row["best_peer"] = best
            row["ours_over_best"] = row["ours_frac"] / ok[best]["frac"] if best else None
            ratio = f"ours/best({best}) {row['ours_over_best']:.2f}" if best else ""
            print(f"{b:>5} {ctx:>6} {splits:>6} {ms:>8.3f} {row['ours_frac']:>5.2f} "
                  f"{row['ours_graph_frac']:>5.2f} {row['sdpa_graph_frac']:>6.2f} "
                  f"{row['host_us']:>7.0f}  err {row['ours_err']:.1e} | " + " | ".join(cells)
                  + f" | {ratio}")  # fmt: skip
            rows.append(row)
            del x, peers, ours, base, out, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def run_autotune(args, device, timer, bw) -> list[dict]:
    """For a few shapes: every tile config at the model's split count, then, for the best tile,
    every split count that some (programs_per_sm, split_cost) of the model would pick plus a
    few around them; then fits the model's two parameters to the measured best counts."""
    print("\n== decode --autotune (fraction of copy bandwidth; default = the tuning table)")
    results = []
    shapes = [(b, c) for b, c in AUTOTUNE_SHAPES if b in args.batches and c in args.contexts]
    sms = tattn._sm_count(device)
    # GPU time from CUDA-graph replays: eager timings of the short shapes (tens of us) measure
    # the host's launch cost, not the kernel
    timed = timer.graph if device.type == "cuda" else timer
    for b, ctx in shapes or [(args.batches[0], args.contexts[-1])]:
        x = decode_inputs(b, ctx, device)
        nbytes = (2 * b * ctx * NUM_KV_HEADS + 2 * b * NUM_HEADS) * HEAD_DIM * DTYPE.itemsize

        def frac(ms: float, nbytes: int = nbytes) -> float:
            return nbytes / (ms * 1e-3) / bw

        default = frac(timed(ours_decode(x)))
        tiles = {}
        for bn, w, st in TILE_CONFIGS:
            h = tattn.num_splits(b, NUM_KV_HEADS, ctx, sms, bn)
            cfg = tattn.DecodeConfig(block_n=bn, num_warps=w, num_stages=st, num_splits=h)
            try:
                tiles[(bn, w, st)] = frac(timed(ours_decode(x, cfg)))
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: skip the config
                print(f"  {b}x{ctx} {(bn, w, st)}: {type(e).__name__}: {str(e)[:80]}")
        best_tile = max(tiles, key=tiles.get)
        h = tattn.num_splits(b, NUM_KV_HEADS, ctx, sms, best_tile[0])
        candidates = {1, max(1, h // 2), h, 2 * h}
        for per_sm in FIT_PROGRAMS_PER_SM:
            for gain in FIT_SHARED_GAINS:
                for cost in FIT_SPLIT_COSTS:
                    candidates.add(tattn.num_splits(b, NUM_KV_HEADS, ctx, sms, best_tile[0],
                                                    per_sm, cost, gain))  # fmt: skip
        splits = {}
        for n in sorted(c for c in candidates if c <= 1024):
            cfg = tattn.DecodeConfig(*best_tile, num_splits=n)
            splits[n] = frac(timed(ours_decode(x, cfg)))
        best_s = max(splits, key=splits.get)
        top = sorted(tiles.items(), key=lambda kv: -kv[1])[:3]
        print(f"{b:>4} x {ctx:<6} default {default:.2f} | best tile (block_n, warps, stages) "
              f"{best_tile} {tiles[best_tile]:.2f} at {h} splits | splits "
              + " ".join(f"{n}:{f:.2f}" for n, f in splits.items())
              + f" -> best {best_s} ({splits[best_s]:.2f}) | top tiles "
              + ", ".join(f"{t}:{f:.2f}" for t, f in top))  # fmt: skip
        results.append({"batch": b, "context": ctx, "default_frac": default, "heuristic_splits": h,
                        "tiles": {str(k): v for k, v in tiles.items()}, "best_tile": best_tile,
                        "splits": splits, "best_splits": best_s})  # fmt: skip
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not results:
        return results
    # The tile that does best over all shapes (geometric mean of its fraction of each shape's best)
    common = set.intersection(*(set(r["tiles"]) for r in results))
    tile_score = {t: math.exp(statistics.fmean(math.log(r["tiles"][t] / max(r["tiles"].values()))
                                               for r in results)) for t in common}  # fmt: skip
    best_overall = max(tile_score, key=tile_score.get) if tile_score else None
    fit = fit_split_model(results, sms)
    print(f"tile over all shapes: {best_overall} at {tile_score.get(best_overall, 0):.3f} of each "
          f"shape's best (geometric mean) -> DECODE_CONFIGS[('narrow', 'big_smem')] in "
          "backends/triton/attention_decode.py")  # fmt: skip
    print(f"split model fit: SPLIT_PROGRAMS_PER_SM = {fit['programs_per_sm']}, SPLIT_SHARED_GAIN = "
          f"{fit['shared_gain']}, SPLIT_COST_TILES = {fit['split_cost']} reach {fit['score']:.3f} "
          "of the best split count's fraction "
          f"(geometric mean; the current constants reach {fit['current']:.3f})")  # fmt: skip
    results.append({"best_tile_overall": best_overall, "tile_score": {str(k): v for k, v in
                    tile_score.items()}, "split_fit": fit})  # fmt: skip
    return results


WIDE_SHAPES = ((64, 512), (64, 4096), (128, 1024), (128, 4096), (256, 160), (256, 512),
               (256, 1024), (256, 2048))  # fmt: skip
WIDE_CONFIGS = ((128, 4, 2), (64, 4, 2), (64, 2, 2), (64, 2, 3), (64, 2, 1), (32, 2, 3), (32, 1, 3),
                (32, 1, 2), (32, 1, 1), (64, 1, 3), (32, 1, 4), (16, 1, 2), (16, 1, 3))  # fmt: skip


def run_wide(args, device, timer, bw) -> list[dict]:
    """The wide-batch decode table (`attention_decode.DECODE_WIDE_BATCH`): at batches whose
    programs fill the GPU several times over, every WIDE_CONFIGS tile on a bf16 and on an FP8
    (e4m3fn) cache, CUDA-graph replays, against the default table's tile, the config the engine
    now picks and SDPA on contiguous KV (bf16). Prints microseconds per call."""
    print("\n== decode wide batches (us per call, graph replays; FP8 cache: e4m3fn, kv_scale 1/64)")
    from backends.triton import attention_decode as dec

    timed = timer.graph if device.type == "cuda" else timer
    shapes = args.wide_shapes if device.type == "cuda" else ((4, 64),)
    sms, rows = tattn._sm_count(device), []
    for b, ctx in shapes:
        x = decode_inputs(b, ctx, device)
        sdpa = decode_peers(x, dict.fromkeys(("fa2", "fa2_paged", "flash_attn", "flex",
                                              "xformers"), "skipped"), False)["sdpa"]  # fmt: skip
        base, sdpa_us = sdpa(), timed(sdpa) * 1e3
        caches = {"bf16": (x.key_cache, x.value_cache, None)}
        caches["fp8"] = (*((c.float() * 64).to(torch.float8_e4m3fn)
                           for c in (x.key_cache, x.value_cache)), 1 / 64)  # fmt: skip
        row = {"batch": b, "context": ctx, "sdpa_us": sdpa_us, "sms": sms}
        for kind, (kc, vc, kv_scale) in caches.items():
            a = (x.q, kc, vc, x.block_tables, x.seq_lens, x.query_start_loc, x.scale)
            picked = dec.decode_config(HEAD_DIM, DTYPE, device, kind == "fp8", b * NUM_KV_HEADS)
            us = {}
            for tile in args.wide_configs:  # (block_n, warps, stages[, 0: FP8 as bytes])
                if kind == "bf16" and len(tile) > 3:
                    continue  # the load mode is only an FP8 cache's: same kernel as NxWxS
                bn, w, st = tile[:3]
                cfg = tattn.DecodeConfig(block_n=bn, num_warps=w, num_stages=st,
                                         fp8_pairs=len(tile) < 4 or bool(tile[3]))  # fmt: skip

                def fn(cfg=cfg, a=a, kv_scale=kv_scale, ctx=ctx):
                    return tattn.decode_attention(*a, kv_scale=kv_scale, max_query_len=1,
                                                  max_seq_len=ctx, config=cfg)  # fmt: skip

                if max_err(fn(), base) > 0.1:
                    raise RuntimeError(f"{kind} {b}x{ctx} {cfg}: wrong result")
                us[tile] = timed(fn) * 1e3
            best = min(us, key=us.get)
            key = (picked.block_n, picked.num_warps, picked.num_stages)
            key += () if picked.fp8_pairs else (0,)
            row[kind] = {"us": {str(k): v for k, v in us.items()}, "picked": str(key),
                         "best": str(best)}  # fmt: skip
            first = us.get(args.wide_configs[0], float("nan"))
            print(f"{b:>4} x {ctx:<5} {kind}: first {first:.0f} | picked {key} "
                  f"{us.get(key, float('nan')):.0f} | best {best} {us[best]:.0f} | sdpa (bf16) "
                  f"{sdpa_us:.0f}")  # fmt: skip
        rows.append(row)
        del x, caches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def fit_split_model(results: list[dict], sms: int) -> dict:
    """(programs_per_sm, shared_gain, split_cost) whose predicted split counts reach the highest
    geometric mean of measured fraction / best measured fraction over the autotuned shapes (a
    count that was not measured scores as the nearest measured one)."""
    from backends.triton import attention_decode as dec

    def score(per_sm: int | None, gain: float | None, cost: float | None) -> float:
        logs = []
        for r in results:
            bn = r["best_tile"][0]
            n = tattn.num_splits(r["batch"], NUM_KV_HEADS, r["context"], sms, bn, per_sm, cost,
                                 gain)  # fmt: skip
            near = min(r["splits"], key=lambda c: abs(c - n))
            logs.append(math.log(r["splits"][near] / max(r["splits"].values())))
        return math.exp(statistics.fmean(logs))

    grid = [(p, g, c) for p in FIT_PROGRAMS_PER_SM for g in FIT_SHARED_GAINS
            for c in FIT_SPLIT_COSTS]  # fmt: skip
    scores = {pgc: score(*pgc) for pgc in grid}
    # Ties: prefer the current constants, then fewer programs and a higher cost (fewer splits).
    current = (dec.SPLIT_PROGRAMS_PER_SM, dec.SPLIT_SHARED_GAIN, dec.SPLIT_COST_TILES)
    best = max(scores, key=lambda k: (round(scores[k], 4), k == current, -k[0], k[2]))
    cur = scores.get(current, score(None, None, None))
    return {
        "programs_per_sm": best[0],
        "shared_gain": best[1],
        "split_cost": best[2],
        "score": scores[best],
        "current": cur,
        "scores": {",".join(map(str, k)): v for k, v in scores.items()},
    }


# -- prefill -------------------------------------------------------------------------------------
def prefill_inputs(batch: int, n: int, device: torch.device, head_dim: int = HEAD_DIM,
                   num_kv_heads: int = NUM_KV_HEADS, seed: int = 1) -> dict:  # fmt: skip
    """batch sequences of n tokens: packed q/k/v [B * n, heads, D] and a paged cache of k/v."""
    g = torch.Generator(device=device).manual_seed(seed)
    t = batch * n
    q = torch.randn(t, NUM_HEADS, head_dim, generator=g, device=device, dtype=DTYPE)
    k = torch.randn(t, num_kv_heads, head_dim, generator=g, device=device, dtype=DTYPE)
    v = torch.randn(t, num_kv_heads, head_dim, generator=g, device=device, dtype=DTYPE)
    pages = -(-n // BLOCK_SIZE)
    perm = torch.randperm(batch * pages, generator=g, device=device)
    paged = (batch * pages, BLOCK_SIZE, num_kv_heads, head_dim)
    kc, vc = (
        torch.zeros(paged, dtype=DTYPE, device=device),
        torch.zeros(paged, dtype=DTYPE, device=device),
    )
    pad = pages * BLOCK_SIZE - n
    for src, dst in ((k, kc), (v, vc)):
        x = src.view(batch, n, num_kv_heads, head_dim)
        x = F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
        dst[perm] = x.reshape(paged)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device) * n
    return dict(q=q, k=k, v=v, key_cache=kc, value_cache=vc,
                block_tables=perm.view(batch, pages).to(torch.int32),
                seq_lens=torch.full((batch,), n, dtype=torch.int32, device=device),
                query_start_loc=qsl, scale=1.0 / math.sqrt(head_dim), batch=batch, n=n)  # fmt: skip


def prefill_impls(x: dict, libs: dict, naive: bool = False) -> dict[str, Callable]:
    b, n = x["batch"], x["n"]
    h, hkv, d = x["q"].shape[1], x["k"].shape[1], x["q"].shape[2]
    group = h // hkv
    impls: dict[str, Callable] = {}
    impls["ours"] = lambda: tattn.attention(
        x["q"], x["key_cache"], x["value_cache"], x["block_tables"], x["seq_lens"],
        x["query_start_loc"], x["scale"], max_query_len=n, max_seq_len=n,
    )  # fmt: skip
    # SDPA on [B, H, N, D] with K/V heads repeated outside the timing (its flash path's layout).
    qs = x["q"].view(b, n, h, d).transpose(1, 2)
    ks = x["k"].view(b, n, hkv, d).transpose(1, 2).repeat_interleave(group, dim=1)
    vs = x["v"].view(b, n, hkv, d).transpose(1, 2).repeat_interleave(group, dim=1)
    impls["sdpa"] = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                           scale=x["scale"])  # fmt: skip
    if libs.get("fa2") is None:
        cu = x["query_start_loc"]
        impls["fa2"] = lambda: fa2_forward(x["q"], x["k"], x["v"], cu, cu, n, n, True, x["scale"])
    if libs.get("xformers") is None:
        import xformers.ops as xops

        bias = xops.fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens([n] * b)
        qx = x["q"].view(1, b * n, hkv, group, d)
        kx = x["k"].view(1, b * n, hkv, 1, d).expand(-1, -1, -1, group, -1)
        vx = x["v"].view(1, b * n, hkv, 1, d).expand(-1, -1, -1, group, -1)
        impls["xformers"] = lambda: xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias,
                                                                    scale=x["scale"])  # fmt: skip
    if libs.get("flash_attn") is None:
        from flash_attn import flash_attn_varlen_func

        cu = x["query_start_loc"]
        impls["flash_attn"] = lambda: flash_attn_varlen_func(
            x["q"], x["k"], x["v"], cu, cu, n, n, softmax_scale=x["scale"], causal=True
        )
    if naive:
        mask = torch.ones(n, n, dtype=torch.bool, device=x["q"].device).tril()

        def naive_fn() -> torch.Tensor:
            # The textbook version: scores materialised [B, H, N, N], softmax in fp32.
            s = torch.matmul(qs, ks.transpose(-1, -2)).float() * x["scale"]
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).to(DTYPE)
            return torch.matmul(p, vs)

        impls = {"naive": naive_fn, **impls}
    return impls


def _as_tokens(out: torch.Tensor, x: dict) -> torch.Tensor:
    """Any impl's output as [B * N, H, D] (SDPA and naive give [B, H, N, D])."""
    b, n, h, d = x["batch"], x["n"], x["q"].shape[1], x["q"].shape[2]
    if out.dim() == 4 and out.shape[1] == h and out.shape[2] == n:
        out = out.transpose(1, 2)
    return out.reshape(b * n, h, d)


def smem_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on this GPU (opt-in maximum)."""
    if device.type != "cuda":
        return 1 << 30  # the interpreter has no limit
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if limit:
        return int(limit)
    return (227 if torch.cuda.get_device_capability(device) >= (9, 0) else 99) * 1024


def ours_prefill(x: dict, config: tattn.PrefillConfig | None = None) -> Callable:
    args = (x["q"], x["key_cache"], x["value_cache"], x["block_tables"], x["seq_lens"],
            x["query_start_loc"], x["scale"])  # fmt: skip
    if config is None:
        return lambda: tattn.attention(*args, max_query_len=x["n"], max_seq_len=x["n"])
    return lambda: tattn.general_attention(*args, config=config)


def run_prefill_autotune(args, device, timer) -> list[dict]:
    """Every PREFILL_TILE_CONFIGS entry whose tiles fit the GPU's shared memory, at a few
    causal prefill shapes; prints each shape's best and the config best over all shapes."""
    print("\n== prefill --autotune (TFLOP/s; default = the tuning table; configs are "
          "(block_m rows, block_n, num_warps, num_stages))")  # fmt: skip
    limit = smem_limit(device)
    head_dim_p2 = max(16, 1 << (HEAD_DIM - 1).bit_length())
    configs = []
    for bm, bn, w, st in PREFILL_TILE_CONFIGS:
        cfg = tattn.PrefillConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
        need = cfg.smem_bytes(head_dim_p2, DTYPE.itemsize)
        if need > limit:
            print(f"  {(bm, bn, w, st)}: skipped, needs {need >> 10} KiB > {limit >> 10} KiB")
            continue
        configs.append(cfg)
    shapes = [sh for sh in PREFILL_AUTOTUNE_SHAPES if sh in args.prefill_shapes]
    results = []
    for b, n in shapes or list(args.prefill_shapes[:1]):
        x = prefill_inputs(b, n, device)
        flops = 4 * NUM_HEADS * HEAD_DIM * b * n * (n + 1) / 2
        ref = _as_tokens(prefill_impls(x, {"fa2": "off", "xformers": "off",
                                           "flash_attn": "off"})["sdpa"](), x)  # fmt: skip
        default = flops / (timer(ours_prefill(x)) * 1e-3) / 1e12
        tflops = {}
        for cfg in configs:
            key = (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)
            fn = ours_prefill(x, cfg)
            try:
                err = max_err(_as_tokens(fn(), x), ref)
                if err > 0.05:
                    print(f"  {b}x{n} {key}: wrong (max err {err:.2e}), skipped")
                    continue
                tflops[key] = flops / (timer(fn) * 1e-3) / 1e12
            except Exception as e:  # noqa: BLE001 - e.g. out of resources: skip the config
                print(f"  {b}x{n} {key}: {type(e).__name__}: {str(e)[:80]}")
        if not tflops:
            continue
        best = max(tflops, key=tflops.get)
        top = sorted(tflops.items(), key=lambda kv: -kv[1])[:4]
        print(f"{b:>3} x {n:<5} default {default:.0f} | best {best} {tflops[best]:.0f} | top "
              + ", ".join(f"{k}:{v:.0f}" for k, v in top))  # fmt: skip
        results.append({"batch": b, "tokens": n, "default_tflops": default,
                        "tflops": {str(k): v for k, v in tflops.items()}, "best": best,
                        "_keys": tflops})  # fmt: skip
        del x, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if results:
        common = set.intersection(*(set(r["_keys"]) for r in results))
        score = {k: math.exp(statistics.fmean(math.log(r["_keys"][k] / max(r["_keys"].values()))
                                              for r in results)) for k in common}  # fmt: skip
        best = max(score, key=score.get)
        print(f"config over all shapes: {best} at {score[best]:.3f} of each shape's best "
              "(geometric mean) -> PREFILL_CONFIGS[('narrow', 'big_smem')] = PrefillConfig"
              f"{best} in backends/triton/attention.py")  # fmt: skip
        for r in results:
            del r["_keys"]
        results.append({"best_overall": best, "score": {str(k): v for k, v in score.items()}})
    return results


def run_prefill(args, device, timer, libs) -> list[dict]:
    print(f"\n== prefill: causal, {NUM_HEADS}/{NUM_KV_HEADS} heads, head_dim {HEAD_DIM}, bf16 "
          "(TFLOP/s; ours reads K/V from the paged cache)")  # fmt: skip
    rows = []
    for b, n in args.prefill_shapes:
        x = prefill_inputs(b, n, device)
        flops = 4 * NUM_HEADS * HEAD_DIM * b * n * (n + 1) / 2  # QK^T and PV, causal half
        impls = prefill_impls(x, libs)
        ref = _as_tokens(impls["sdpa"](), x)
        row = {"batch": b, "tokens": n, "impls": {}}
        cells = []
        for name, fn in impls.items():
            try:
                err = max_err(_as_tokens(fn(), x), ref)
                ms = timer(fn)
            except Exception as e:  # noqa: BLE001
                cells.append(f"{name} failed ({type(e).__name__}: {str(e)[:60]})")
                continue
            row["impls"][name] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "err": err}
            cells.append(f"{name} {row['impls'][name]['tflops']:.0f} ({ms:.3f} ms; {err:.1e})")
        peers = [row["impls"][p]["tflops"] for p in ("sdpa", "fa2") if p in row["impls"]]
        if "ours" in row["impls"] and peers:
            row["ours_over_best"] = row["impls"]["ours"]["tflops"] / max(peers)
            cells.append(f"ours/best(sdpa, fa2) {row['ours_over_best']:.2f}")
        print(f"{b:>3} x {n:<5} " + " | ".join(cells))
        rows.append(row)
        del x, impls, ref
    return rows


# -- compare -------------------------------------------------------------------------------------
def run_compare(args, device, timer, libs) -> list[dict]:
    """The seed documents' table done right: same inputs, same run, outputs checked against SDPA,
    latency as a median of L2-cold calls, peak memory measured by the allocator."""
    print("\n== compare: causal prefill, naive vs SDPA vs FA2 vs xFormers vs ours "
          f"({NUM_HEADS}/{NUM_KV_HEADS} heads, bf16)")  # fmt: skip
    print(f"{'shape':>16} {'impl':>11} {'ms':>8} {'tok/s':>12} {'peak MiB':>9} {'max err':>8}")
    rows = []
    for b, n, d in args.compare_shapes:
        x = prefill_inputs(b, n, device, head_dim=d)
        naive_bytes = b * NUM_HEADS * n * n * 4 * 3  # fp32 scores, masked copy, probabilities
        impls = prefill_impls(x, libs, naive=naive_bytes <= args.mem_cap_gb * 2**30)
        ref = _as_tokens(impls["sdpa"](), x)
        for name, fn in impls.items():
            entry = {"batch": b, "tokens": n, "head_dim": d, "impl": name}
            try:
                entry["max_err"] = max_err(_as_tokens(fn(), x), ref)
                entry["ms"] = timer(fn)
                entry["peak_mib"] = peak_memory(fn, device)
            except Exception as e:  # noqa: BLE001
                entry["error"] = f"{type(e).__name__}: {str(e)[:80]}"
                print(f"{f'{b}x{n} d{d}':>16} {name:>11} failed: {entry['error']}")
                rows.append(entry)
                continue
            entry["tokens_per_s"] = b * n / (entry["ms"] * 1e-3)
            print(f"{f'{b}x{n} d{d}':>16} {name:>11} {entry['ms']:>8.3f} "
                  f"{entry['tokens_per_s']:>12,.0f} {entry['peak_mib']:>9.1f} "
                  f"{entry['max_err']:>8.1e}")  # fmt: skip
            rows.append(entry)
        del x, impls, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def compare_markdown(rows: list[dict]) -> str:
    lines = [
        "| shape (B x N, head_dim) | impl | latency ms | tokens/s | peak MiB | max err vs SDPA |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = f"{r['batch']} x {r['tokens']}, {r['head_dim']}"
        if "error" in r:
            lines.append(f"| {shape} | {r['impl']} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {shape} | {r['impl']} | {r['ms']:.3f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['peak_mib']:.1f} | {r['max_err']:.1e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _pairs(text: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(v) for v in p.split("x")) for p in text.split(",") if p)


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "commit": commit,
            "command": " ".join(sys.argv)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    global BLOCK_SIZE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "modes",
        nargs="+",
        choices=("decode", "wide", "prefill", "compare", "all"),
        metavar="MODE",
        help="decode, wide (the wide-batch decode table), prefill, compare or all (one or more)",
    )
    p.add_argument("--autotune", action="store_true",
                   help="decode: search tiles and fit the split model; prefill: search tiles "
                   "(all: both)")  # fmt: skip
    p.add_argument("--out", type=Path, help="directory for JSON (and compare.md)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=_ints, default=BATCHES)
    p.add_argument("--contexts", type=_ints, default=CONTEXTS)
    p.add_argument(
        "--prefill-shapes", type=_pairs, default=PREFILL_SHAPES, help="e.g. 1x512,8x1024"
    )
    p.add_argument("--compare-shapes", type=_pairs, default=COMPARE_SHAPES,
                   help="BxNxD, e.g. 1x512x64,1x2048x128")  # fmt: skip
    p.add_argument("--flex-shapes", type=_pairs, default=FLEX_SHAPES,
                   help="decode shapes BxL where FlexAttention runs ('' for none)")  # fmt: skip
    p.add_argument("--fp8-shapes", type=_pairs, default=FLEX_SHAPES,
                   help="decode shapes BxL where ours also runs on an FP8 KV cache")  # fmt: skip
    p.add_argument("--wide-shapes", type=_pairs, default=WIDE_SHAPES,
                   help="wide: the decode shapes BxL swept, e.g. 256x160,512x192")  # fmt: skip
    p.add_argument(
        "--wide-configs",
        type=_pairs,
        default=WIDE_CONFIGS,
        help="wide: the tiles swept as NxWxS (block_n x warps x stages), e.g. 16x1x3; NxWxSx0: "
        "an FP8 cache loaded as bytes (DecodeConfig.fp8_pairs=False)",
    )
    p.add_argument("--block-size", type=int, default=BLOCK_SIZE,
                   help="tokens per KV page (16: the engine's default)")  # fmt: skip
    p.add_argument("--flex-all", action="store_true", help="FlexAttention at every decode shape")
    p.add_argument("--mem-cap-gb", type=float, default=40.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    BLOCK_SIZE = args.block_size
    device = torch.device(args.device)
    t0 = time.perf_counter()
    timer = Timer(device, args.warmup, args.reps)
    env = environment(device)
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    libs = probe_libraries(device)
    for name, why in libs.items():
        print(f"  {name}: {'ok' if why is None else 'not used: ' + why}")
    bw = copy_bandwidth(device, timer)
    print(f"  copy bandwidth: {bw / 1e12:.3f} TB/s (1 GiB device-to-device, read + write)")
    results: dict = {"env": env, "libraries": libs, "copy_bandwidth": bw}
    modes = {"decode", "prefill", "compare"} if "all" in args.modes else set(args.modes)
    tune = args.autotune or "all" in args.modes
    if "decode" in modes and tune:
        results["autotune"] = run_autotune(args, device, timer, bw)
    if "decode" in modes:
        results["decode"] = run_decode(args, device, timer, bw, libs)
    if "wide" in modes:
        results["wide"] = run_wide(args, device, timer, bw)
    if "prefill" in modes and tune:
        results["prefill_autotune"] = run_prefill_autotune(args, device, timer)
    if "prefill" in modes:
        results["prefill"] = run_prefill(args, device, timer, libs)
    if "compare" in modes:
        results["compare"] = run_compare(args, device, timer, libs)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"attention_{'_'.join(args.modes)}.json"
        path.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {path}")
        if "compare" in results:
            (args.out / "compare.md").write_text(compare_markdown(results["compare"]))
            print(f"wrote {args.out / 'compare.md'}")


if __name__ == "__main__":
    main()
