"""Decode-sized GEMMs (backends/triton/gemv.py) against torch on the Llama-3-8B shapes at M = 1..16:
bf16 against F.linear (cuBLAS), FP8 e4m3fn (per-row scales) against torch._scaled_mm row-wise,
"silu" (the gate_up GEMM writing silu(gate) * up from its epilogue,
`linear_silu_and_mul_small_m`) against the two kernels it replaces (our GEMM, then our activation
kernel), and "rotary" (the qkv GEMM rotating q and k and writing the KV cache from its epilogue,
`linear_rotary_write_kv_small_m`; head_dim 128, 4 query heads per KV head) against our GEMM then
our rotary + KV-write kernel, with the copy bandwidth measured in the same run.

    python bench/gemv.py --out gemv.json                 # the kernels' table (or heuristic)
    python bench/gemv.py --separate-reduce               # also the split-K sum as its own kernel
    python bench/gemv.py --autotune --out gemv_tune.json # sweep configs per shape and M, print
                                                         # the best as a DEFAULT_CONFIGS table,
                                                         # then benchmark with it
    python bench/gemv.py --kinds rotary --shapes qkv qkv_tp2   # the fused qkv + rotary launch
    python bench/gemv.py --kinds silu --shapes gate_up gate_up_tp2 --autotune
                                                         # the fused gate_up + SiLU launch shapes
                                                         # (a SILU_CONFIGS table)

Timing: CUDA graphs of one or more passes over several weight copies (together > 3x L2, so every
call reads its weight from DRAM; x stays hot, as in decode), replayed between torch.cuda.Event
pairs after warm-up; the median of the reps, divided by the calls per replay. GB/s counts the
weight bytes only; "of copy" is that over the measured copy bandwidth (read + write of a 1 GiB
clone). "ours/torch" is the throughput ratio torch_ms / ours_ms (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import itertools
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.triton import activation, gemv, rotary  # noqa: E402
from bench.attention import Timer  # noqa: E402
from bench.attention import copy_bandwidth as attention_copy_bandwidth  # noqa: E402

# name -> (K, N): Llama-3-8B (hidden 4096, 32 q / 8 kv heads of 128, MLP 14336, vocab 128256)
SHAPES = {
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
    "lm_head": (4096, 128256),
}
DEFAULT_SHAPES = list(SHAPES)
# One rank's slices at tensor-parallel size 2 (columns split for qkv / gate_up, rows for o /
# down): shapes the tuning table lacks, so they show `gemv.heuristic_config` (`--shapes
# qkv_tp2 o_tp2 gate_up_tp2 down_tp2`).
SHAPES.update({
    "qkv_tp2": (4096, 3072),
    "o_tp2": (2048, 4096),
    "gate_up_tp2": (4096, 14336),
    "down_tp2": (7168, 4096),
})  # fmt: skip
# Llama-3.2-3B (hidden 3072, 24 q / 8 kv heads of 128, MLP 8192): shapes no table holds, so they
# measure `gemv.heuristic_config` on a model the tables were not tuned for (`--shapes l3b_qkv
# l3b_o l3b_gate_up l3b_down`).
SHAPES.update({
    "l3b_qkv": (3072, 5120),
    "l3b_o": (3072, 3072),
    "l3b_gate_up": (3072, 16384),
    "l3b_down": (8192, 3072),
})  # fmt: skip
LAYERS = 32  # per decode step: 32 x (qkv, o, gate_up, down) + lm_head
MS = (1, 2, 4, 8, 16)
KINDS = ("bf16", "fp8", "silu", "rotary")
DEFAULT_KINDS = ["bf16", "fp8"]
FP8 = torch.float8_e4m3fn
W_BYTES = {"bf16": 2, "fp8": 1, "silu": 2, "rotary": 2}
HEAD_DIM, GQA = 128, 4  # "rotary": N = (GQA + 2) x KV heads x HEAD_DIM
MIN_REPLAY_MS = 0.3  # a replay at least this long, so event overhead stays below ~1%


# -- timing --------------------------------------------------------------------------------------
def timed(fns: list, reps: int, warmup: int = 3) -> float:
    """Median ms per call of `fns` (the calls captured in one CUDA graph, replayed `reps` times)."""
    for fn in fns[:2]:
        fn()  # compile / initialise outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    del graph
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written), bench/attention.py's method:
    timed eagerly (captured in a CUDA graph the copy becomes a copy-engine node, 2.68 TB/s on an
    H200 against 4.25 for the copy kernel, which made every "of copy" fraction 1.6x too high)."""
    device = torch.device("cuda")
    return attention_copy_bandwidth(device, Timer(device, warmup=5, reps=reps)) / 1e9


@dataclasses.dataclass
class Weights:
    """Copies of one shape's weight (bf16, or FP8 with per-row scales) and the calls' x."""

    kind: str
    k: int
    n: int
    copies: list[tuple[torch.Tensor, torch.Tensor | None]]  # (w [N, K], w_scale [N, 1] | None)

    @property
    def nbytes(self) -> int:
        return self.n * self.k * W_BYTES[self.kind]

    def calls(self, make, copy_gbs: float) -> list:
        """One call per copy, repeated so a replay lasts >= MIN_REPLAY_MS at copy speed."""
        one = [make(w, s) for w, s in self.copies]
        est_ms = self.nbytes / (copy_gbs * 1e9) * 1e3
        passes = max(1, math.ceil(MIN_REPLAY_MS / (est_ms * len(one))))
        return one * passes


def make_weights(kind: str, k: int, n: int, l2: int) -> Weights:
    count = max(2, math.ceil(3 * l2 / (n * k * W_BYTES[kind])))
    copies = []
    # nn.Parameters, as the engine holds its weights: the GEMV then reads its first tile before
    # the PDL wait (`gemv.EARLY`), as it does in a decode step.
    for _ in range(count):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        if kind != "fp8":
            copies.append((torch.nn.Parameter(w, requires_grad=False), None))
        else:
            scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
            w_q = torch.nn.Parameter((w.float() / scale).to(FP8), requires_grad=False)
            copies.append((w_q, scale))
        del w
    return Weights(kind, k, n, copies)


def make_x(kind: str, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if kind != "fp8":
        return x, None
    scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
    return (x.float() / scale).to(FP8), scale


_ROTARY_CTX: dict = {}


def rotary_ctx(m: int, n: int) -> dict:
    """Positions, cos / sin table, slots and caches for a "rotary" call of M tokens and N rows."""
    key = (m, n)
    if key not in _ROTARY_CTX:
        from hal.rope import build_cos_sin_cache

        kv_heads = n // ((GQA + 2) * HEAD_DIM)
        cache = torch.zeros(64, 16, kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        _ROTARY_CTX[key] = dict(
            num_heads=GQA * kv_heads, num_kv_heads=kv_heads,
            positions=torch.arange(100, 100 + m, device="cuda"),
            cos_sin_cache=build_cos_sin_cache(HEAD_DIM, 4096, 500000.0, None).cuda(),
            key_cache=cache, value_cache=cache.clone(),
            slot_mapping=torch.arange(7, 7 + m, device="cuda"),
        )  # fmt: skip
    return _ROTARY_CTX[key]


def two_kernel_rotary(x, w) -> torch.Tensor:
    """Our GEMM, then our rotary + KV-write kernel: the path the fused launch replaces."""
    c = rotary_ctx(x.shape[0], w.shape[0])
    h = gemv.linear_small_m(x, w)
    q, k, v = h.view(x.shape[0], -1, HEAD_DIM).split(
        [c["num_heads"], c["num_kv_heads"], c["num_kv_heads"]], dim=1
    )
    q, k = rotary.rotary_write_kv(c["positions"], q, k, v, c["cos_sin_cache"], True,
                                  c["key_cache"], c["value_cache"], c["slot_mapping"])  # fmt: skip
    return torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)


def ours_call(kind: str, x, x_scale, configs=None, config=None, fused=None):
    kw = dict(configs=configs, config=config, fused_reduce=fused)
    if kind == "rotary":
        return lambda w, s: (
            lambda: gemv.linear_rotary_write_kv_small_m(
                x, w, None, **rotary_ctx(x.shape[0], w.shape[0]), **kw
            )
        )
    if kind == "bf16":
        return lambda w, s: lambda: gemv.linear_small_m(x, w, **kw)
    if kind == "silu":
        return lambda w, s: lambda: gemv.linear_silu_and_mul_small_m(x, w, **kw)
    return lambda w, s: (
        lambda: gemv.fp8_linear_small_m(x, x_scale, w, s, None, torch.bfloat16, **kw)
    )


def torch_call(kind: str, x, x_scale):
    if kind == "bf16":
        return lambda w, s: lambda: F.linear(x, w)
    if kind == "silu":  # the peer of the fused launch: the two kernels it replaces
        return lambda w, s: lambda: activation.silu_and_mul(gemv.linear_small_m(x, w))
    if kind == "rotary":
        return lambda w, s: lambda: two_kernel_rotary(x, w)
    # row-wise: scale_a [M, 1], scale_b [1, N] fp32, bf16 out (Hopper's kernel)
    return lambda w, s: (
        lambda: torch._scaled_mm(
            x, w.t(), scale_a=x_scale, scale_b=s.reshape(1, -1), out_dtype=torch.bfloat16
        )
    )


def rel_err(kind, weights: Weights, x, x_scale, configs=None, config=None) -> tuple[float, bool]:
    """(max |ours - fp32 product| / max |product|, two runs bit-identical)."""
    w, s = weights.copies[0]
    y1 = ours_call(kind, x, x_scale, configs, config)(w, s)()
    y2 = ours_call(kind, x, x_scale, configs, config)(w, s)()
    if kind == "bf16":
        ref = x.float() @ w.float().t()
    elif kind == "silu":
        gate, up = (x.float() @ w.float().t()).chunk(2, dim=-1)
        ref = F.silu(gate) * up
    elif kind == "rotary":  # against the two kernels (the same bits expected: error 0)
        ref = two_kernel_rotary(x, w).float()
    else:
        ref = (x.float() @ w.float().t()) * x_scale * s.reshape(1, -1)
    err = float((y1.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    return err, bool(torch.equal(y1, y2))


# -- autotune ------------------------------------------------------------------------------------
def candidates(kind: str, m: int) -> list[gemv.GemvConfig]:
    """Launch shapes to try: FMA tiles (M <= 2; each thread holds <= 64 fp32 products) and
    tensor-core tiles whose pipeline fits in shared memory; split_k 0 (auto) here, the K
    splits are swept around the best few afterwards."""
    wb = W_BYTES[kind]
    out = []
    if m <= 2:
        # Wide K tiles too (1024-2048): a program's loads of one step are all it has in flight
        # (the FMA loop is not software-pipelined), so a small N's few programs per SM hold
        # more bytes in flight with longer steps (compiled for sm_90 without spills).
        for bn, bk, warps in ((8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4),
                              (32, 512, 8), (64, 256, 8), (4, 1024, 4), (8, 1024, 4),
                              (4, 2048, 4), (8, 1024, 8), (16, 1024, 8)):  # fmt: skip
            out.append(gemv.GemvConfig("fma", bn, bk, 0, warps, 1))
    for bn, bk_bytes, stages in itertools.product((32, 64, 128), (256, 512), (3, 4, 5)):
        bk = bk_bytes // wb
        smem = stages * (bn + gemv.DOT_BLOCK_M) * bk * wb
        converted = bn * bk / 128 if kind == "fp8" else 0  # fp16 values per thread (4 warps)
        if smem <= 160 * 1024 and converted <= 128:
            out.append(gemv.GemvConfig("dot", bn, bk, 0, 4, stages))
    return out


def _compile_job(job: tuple[str, gemv.GemvConfig]) -> str:
    # In a worker process: one launch on small tensors with the same specialisation as the real
    # shapes (dims and strides multiples of 16, K a multiple of every block_k), which fills
    # Triton's on-disk cache for the main process.
    kind, cfg = job
    m, n, k = 2, 64, 4096
    x, x_scale = make_x(kind, m, k)
    weights = make_weights(kind, k, n, l2=0)
    w, s = weights.copies[0]
    for split in (1, 2):  # the reduce kernel too
        ours_call(kind, x, x_scale, config=dataclasses.replace(cfg, split_k=split))(w, s)()
    torch.cuda.synchronize()
    return f"{kind} {cfg}"


def precompile(kinds: list[str], ms: list[int]) -> None:
    """Compile every candidate in parallel worker processes (Triton compiles on the CPU, one
    kernel at a time per process), so the sweep itself mostly times kernels."""
    jobs = sorted({(kind, c) for kind in kinds for m in ms for c in candidates(kind, m)}, key=str)
    workers = max(1, min(len(jobs), os.cpu_count() or 1, 16))
    start = time.perf_counter()
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            list(pool.map(_compile_job, jobs))
        print(f"precompiled {len(jobs)} configs on {workers} processes in "
              f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the sweep compiles lazily instead
        print(f"precompile failed ({type(exc).__name__}: {exc}); compiling during the sweep")


def tune_one(kind: str, w: Weights, m: int, copy_gbs: float, sms: int) -> dict:
    """{config: ms} for one (kind, shape, M): every candidate at auto split, then K splits
    around the three fastest."""
    x, x_scale = make_x(kind, m, w.k)
    tried: dict[gemv.GemvConfig, float] = {}

    def measure(cfg: gemv.GemvConfig) -> None:
        if cfg in tried:
            return
        try:
            tried[cfg] = timed(w.calls(ours_call(kind, x, x_scale, config=cfg), copy_gbs), 5)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
            print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:80]}")

    for cfg in candidates(kind, m):
        measure(cfg)
    for cfg in sorted(tried, key=tried.get)[:3]:
        tiles = math.ceil(w.k / cfg.block_k)
        auto = gemv.split_plan(cfg, m, w.n, w.k, sms)[0]
        for split in (1, 2, 4, 8, 16):
            if split <= tiles and split != auto:
                measure(dataclasses.replace(cfg, split_k=split))
    return tried


def table_name(kind: str) -> str:
    """The gemv.py table a kind's tuned configs go to."""
    return "SILU_CONFIGS" if kind == "silu" else "DEFAULT_CONFIGS"


def autotune(args, weights: dict, copy_gbs: float, results: dict) -> dict:
    """Best config per (kind, shape, M). Returns {table name: {(w_bytes, M bucket, N, K):
    config}}."""
    tables: dict = {}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for kind, label, m in itertools.product(args.kinds, args.shapes, args.ms):
        w = weights[kind, label]
        tried = tune_one(kind, w, m, copy_gbs, sms)
        fastest = min(tried, key=tried.get)
        # split_k 0 is pinned to the split it resolved to, so the table does not depend on it
        best = fastest
        if best.split_k == 0:
            best = dataclasses.replace(best, split_k=gemv.split_plan(best, m, w.n, w.k, sms)[0])
        table = tables.setdefault(table_name(kind), {})
        table[W_BYTES[kind], gemv.m_bucket(m), w.n, w.k] = best
        frac = w.nbytes / (tried[fastest] * 1e-3) / 1e9 / copy_gbs
        print(f"  {kind:4s} {label:8s} M={m:2d}: {len(tried):2d} configs, best {best} "
              f"{frac:.2f} of copy")  # fmt: skip
        results["autotune"].append({
            "kind": kind, "shape": label, "m": m, "best": dataclasses.asdict(best),
            "tried": [{**dataclasses.asdict(c), "ms": t} for c, t in tried.items()],
        })  # fmt: skip
    return tables


def print_table(name: str, table: dict, device: str) -> None:
    print(f"\nTuned table (paste into backends/triton/gemv.py {name}):")
    print(f"{name}: dict[ConfigKey, GemvConfig] = {{")
    print(f"    # {device}, {datetime.date.today()}, python bench/gemv.py --autotune")
    for key in sorted(table):
        c = table[key]
        print(f"    {key}: GemvConfig({c.kernel!r}, {c.block_n}, {c.block_k}, split_k={c.split_k}, "
              f"num_warps={c.num_warps}, num_stages={c.num_stages}),")  # fmt: skip
    print("}")


# -- main ----------------------------------------------------------------------------------------
def bench(args, weights: dict, copy_gbs: float, results: dict, tables=None) -> None:
    # "peer": torch (F.linear, _scaled_mm), or for "silu" our GEMM then our activation kernel
    print(f"\n{'kind':4s} {'shape':8s} {'M':>2s} {'ours ms':>8s} {'GB/s':>6s} {'copy':>5s} "
          f"{'peer ms':>8s} {'GB/s':>6s} {'copy':>5s} {'ours/peer':>10s} {'rel err':>8s} "
          f"{'det':>3s}  config")  # fmt: skip
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for kind, label, m in itertools.product(args.kinds, args.shapes, args.ms):
        w = weights[kind, label]
        configs = (tables or {}).get(table_name(kind))
        x, x_scale = make_x(kind, m, w.k)
        ours = timed(w.calls(ours_call(kind, x, x_scale, configs), copy_gbs), args.reps)
        try:
            peer = timed(w.calls(torch_call(kind, x, x_scale), copy_gbs), args.reps)
        except RuntimeError as exc:  # e.g. a torch build without the row-wise kernel
            print(f"  torch peer failed: {str(exc)[:100]}")
            peer = math.nan
        err, det = rel_err(kind, w, x, x_scale, configs)
        cfg = gemv.pick_config(W_BYTES[kind], m, w.n, w.k, configs, silu=kind == "silu")
        splits = gemv.split_plan(cfg, m, w.n, w.k, sms)[0]
        separate_ms = math.nan
        if args.separate_reduce and splits > 1:  # the split-K sum as a second kernel, same run
            separate_call = ours_call(kind, x, x_scale, configs, fused=False)
            separate_ms = timed(w.calls(separate_call, copy_gbs), args.reps)
        row = {
            "kind": kind, "shape": label, "m": m, "k": w.k, "n": w.n,
            "config": dataclasses.asdict(cfg), "splits": splits,
            "ours_ms": ours, "ours_gbs": w.nbytes / (ours * 1e-3) / 1e9,
            "torch_ms": peer, "torch_gbs": w.nbytes / (peer * 1e-3) / 1e9,
            "ours_over_torch": peer / ours, "rel_err": err, "deterministic": det,
            "separate_reduce_ms": separate_ms,
        }  # fmt: skip
        row["ours_frac_copy"] = row["ours_gbs"] / copy_gbs
        row["torch_frac_copy"] = row["torch_gbs"] / copy_gbs
        results["rows"].append(row)
        print(f"{kind:4s} {label:8s} {m:2d} {ours:8.4f} {row['ours_gbs']:6.0f} "
              f"{row['ours_frac_copy']:5.2f} {peer:8.4f} {row['torch_gbs']:6.0f} "
              f"{row['torch_frac_copy']:5.2f} {row['ours_over_torch']:10.2f} {err:8.1e} "
              f"{'yes' if det else 'NO':>3s}  {cfg.kernel} {cfg.block_n}x{cfg.block_k} "
              f"split {splits} w{cfg.num_warps} s{cfg.num_stages}"
              + (f"; separate reduce {separate_ms:.4f} ms (fused {separate_ms / ours:.2f}x)"
                 if separate_ms == separate_ms else ""))  # fmt: skip
    # The decode step's GEMMs at M = 1 (attention, norms and the rest excluded).
    for kind in args.kinds:
        rows = {r["shape"]: r for r in results["rows"] if r["kind"] == kind and r["m"] == 1}
        if not set(DEFAULT_SHAPES) <= set(rows):
            continue
        count = {label: (1 if label == "lm_head" else LAYERS) for label in DEFAULT_SHAPES}
        total = {
            key: sum(count[s] * rows[s][key] for s in DEFAULT_SHAPES)
            for key in ("ours_ms", "torch_ms")
        }
        nbytes = sum(count[s] * weights[kind, s].nbytes for s in DEFAULT_SHAPES)
        floor = nbytes / (copy_gbs * 1e9) * 1e3
        results[f"decode_gemms_m1_{kind}"] = {**total, "floor_ms": floor}
        print(f"{kind} batch-1 decode GEMMs ({nbytes / 1e9:.2f} GB of weights): ours "
              f"{total['ours_ms']:.3f} ms, torch {total['torch_ms']:.3f} ms, floor {floor:.3f} ms "
              f"(ours {total['ours_ms'] / floor:.2f}x the floor)")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--autotune", action="store_true", help="sweep configs, print the table")
    p.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=DEFAULT_KINDS,
        help="silu: the fused gate_up + activation (gate_up shapes only); rotary: the fused qkv "
        "+ rotary + KV write (qkv shapes only)",
    )
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=DEFAULT_SHAPES)
    p.add_argument("--ms", type=int, nargs="+", default=list(MS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--separate-reduce",
        action="store_true",
        help="also time the split-K sum as its own kernel (the default folds it into the GEMV)",
    )
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: this benchmark times compiled kernels", file=sys.stderr)
        return 2
    start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    if args.autotune and "rotary" in args.kinds:
        print("--kinds rotary takes the plain GEMV's table: autotune --kinds bf16", file=sys.stderr)
        return 2
    if args.autotune:
        precompile(args.kinds, args.ms)
    copy_gbs = copy_bandwidth(args.reps)
    results: dict = {
        "device": props.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit, "torch": torch.__version__, "triton": gemv.triton.__version__,
        "copy_gbs": copy_gbs, "early_weights": gemv.EARLY, "rows": [], "autotune": [],
    }  # fmt: skip
    print(f"{props.name}: copy bandwidth {copy_gbs:.0f} GB/s (1 GiB copy, read + write), "
          f"L2 {l2 / 2**20:.0f} MiB, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {gemv.triton.__version__}, early weight loads "
          f"{'on' if gemv.EARLY else 'off (HAL_GEMV_EARLY=0)'}")  # fmt: skip
    weights = {}
    for kind, label in itertools.product(args.kinds, args.shapes):
        k, n = SHAPES[label]
        weights[kind, label] = make_weights(kind, k, n, l2)
    tables = None
    if args.autotune:
        tables = autotune(args, weights, copy_gbs, results)
        for name, table in tables.items():
            print_table(name, table, props.name)
        results["tables"] = {
            name: [{"key": list(k), **dataclasses.asdict(c)} for k, c in table.items()]
            for name, table in tables.items()
        }
    bench(args, weights, copy_gbs, results, tables)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
