"""The ROCm backend's kernels run natively on an NVIDIA GPU against the CPU reference, through the
vendor-neutral path: MI300X capabilities and tiles (attention), e4m3fnuz FP8 from the bits, graph
capture through torch.cuda.CUDAGraph; no AMD-only compile options (Triton compiles for CUDA).

    python bench/rocm_on_nvidia.py            # prints a pass/fail table; exit 1 on any failure
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

from backends.cpu import activation as ref_act  # noqa: E402
from backends.cpu import attention as ref_attn  # noqa: E402
from backends.cpu import kv_cache as ref_kv  # noqa: E402
from backends.cpu import linear as ref_linear  # noqa: E402
from backends.cpu import norm as ref_norm  # noqa: E402
from backends.cpu import quant as ref_quant  # noqa: E402
from backends.cpu import rotary as ref_rotary  # noqa: E402
from backends.rocm import tuning  # noqa: E402
from backends.rocm.backend import RocmBackend  # noqa: E402
from hal.capabilities import LibraryInfo  # noqa: E402
from hal.registry import REGISTRY  # noqa: E402
from platforms import load_profile  # noqa: E402
from tests.conformance import strategies as S  # noqa: E402
from tests.conformance.tolerances import tolerance  # noqa: E402

F64, FNUZ = torch.float64, torch.float8_e4m3fnuz


def make_backend() -> RocmBackend:
    """RocmBackend on cuda:0 with the MI300X profile, Triton usable; FP8 GEMMs dequantize (no
    NVIDIA GPU multiplies e4m3fnuz)."""
    caps = load_profile("mi300x")
    caps = dataclasses.replace(
        caps, libraries={**caps.libraries, "triton": LibraryInfo("triton", None, True)}
    )
    forced = {"fp8_gemm": "dequant_gemm"}
    sel = {f: REGISTRY.select(f, caps, scope="rocm") for f in REGISTRY.families("rocm")}
    for family, name in forced.items():
        sel[family] = dataclasses.replace(sel[family], chosen=name)
    return RocmBackend(caps, "cuda", sel)


def close(out: torch.Tensor, ref: torch.Tensor, dtype: str, magnitude=1.0, k=1) -> tuple[bool, str]:
    err = (out.cpu().to(F64) - ref.to(F64)).abs()
    ok = bool((err <= tolerance(dtype).allowed(ref.to(F64), magnitude, k)).all())
    return ok, f"max err {err.max().item():.2e}"


def bitwise(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, str]:
    a, b = out.cpu(), ref.cpu()
    if a.element_size() == 1 and a.is_floating_point():
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b), "bitwise"


def attention_case(b: RocmBackend, dtype: str, cache: str, decode: bool) -> tuple[bool, str]:
    g = torch.Generator().manual_seed(1)
    seq_lens = tuple(int(v) for v in torch.randint(1, 300, (6,), generator=g))
    q_lens = (1,) * 6 if decode else (1, seq_lens[1], max(1, seq_lens[2] // 3), 1, 7, 1)
    q_lens = tuple(min(q, s) for q, s in zip(q_lens, seq_lens, strict=True))
    blocks = sum(-(-n // 16) for n in seq_lens) + 2
    case = S.AttentionBatch(
        dtype=dtype, cache_dtype=cache, num_kv_heads=2, gqa_ratio=4, head_dim=128, block_size=16,
        seq_lens=seq_lens, query_lens=q_lens, num_blocks=blocks,
        block_order=tuple(int(v) for v in torch.randperm(blocks, generator=g)),
        sliding_window=None if decode else 50, soft_cap=None if decode else 30.0,
        kv_scale=0.5 if cache.startswith("fp8") else None, score_scale=1.0, num_padding=0,
        seed=1,
    )  # fmt: skip
    t = case.build()
    names = ("query", "key_cache", "value_cache", "block_tables", "seq_lens", "query_start_loc")
    args = [t[n] for n in names]
    rest = (0.088, case.sliding_window, case.soft_cap, case.kv_scale)
    out = b.attention(*(a.cuda() for a in args), *rest)
    ref = ref_attn.paged_attention(args[0].to(F64), *args[1:], *rest)
    return close(out, ref, dtype, t["value"].abs().max().item(), max(seq_lens))


def cases(b: RocmBackend) -> dict[str, Callable[[], tuple[bool, str]]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 4096, generator=g)
    w = torch.randn(4096, generator=g)
    out: dict[str, Callable[[], tuple[bool, str]]] = {}
    for dt, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        xd = x.to(tdt)
        out[f"rms_norm {dt}"] = lambda xd=xd, dt=dt: close(
            b.rms_norm(xd.cuda(), w.to(xd.dtype).cuda(), 1e-6),
            ref_norm.rms_norm(xd.to(F64), w.to(xd.dtype).to(F64), 1e-6),
            dt,
            k=4096,
        )
        out[f"silu_and_mul {dt}"] = lambda xd=xd, dt=dt: close(
            b.silu_and_mul(xd.cuda()), ref_act.silu_and_mul(xd.to(F64)), dt, 4.0
        )
        out[f"attention prefill {dt}"] = lambda dt=dt: attention_case(b, dt, dt, False)
        out[f"attention decode {dt}"] = lambda dt=dt: attention_case(b, dt, dt, True)
    out["attention decode bf16, e4m3fnuz cache"] = lambda: attention_case(
        b, "bf16", "fp8_e4m3fnuz", True
    )
    out["attention prefill fp16, e4m3fnuz cache"] = lambda: attention_case(
        b, "fp16", "fp8_e4m3fnuz", False
    )
    pos = torch.randint(0, 512, (37,), generator=g)
    q, k = torch.randn(37, 32, 128, generator=g), torch.randn(37, 8, 128, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, 128, 2) / 128))
    ang = torch.arange(512)[:, None] * inv[None, :]
    cs = torch.cat([ang.cos(), ang.sin()], dim=1)
    out["rotary neox bf16"] = lambda: close(
        b.rotary(pos.cuda(), q.bfloat16().cuda(), k.bfloat16().cuda(), cs.cuda())[0],
        ref_rotary.rotary(pos, q.bfloat16().to(F64), k.bfloat16().to(F64), cs.to(F64))[0],
        "bf16",
        4.0,
    )
    xq = x[:, :512] * 30
    out["quantize_fp8 e4m3fnuz per token"] = lambda: bitwise(
        b.quantize_fp8(xq.cuda(), FNUZ, per_token=True)[0],
        ref_quant.quantize_fp8(xq, FNUZ, per_token=True)[0],
    )
    out["write_kv e4m3fnuz cache"] = lambda: write_kv_case(b)
    out["fp8_linear e4m3fn checkpoint on fnuz"] = lambda: fp8_linear_case(b)
    out["hip_graph replay = eager"] = lambda: graph_case(b)
    return out


def write_kv_case(b: RocmBackend) -> tuple[bool, str]:
    g = torch.Generator().manual_seed(2)
    key, value = torch.randn(40, 8, 128, generator=g), torch.randn(40, 8, 128, generator=g)
    slots = torch.randperm(64 * 16, generator=g)[:40]
    slots[::9] = -1
    kc, vc = torch.zeros(64, 16, 8, 128).to(FNUZ), torch.zeros(64, 16, 8, 128).to(FNUZ)
    ok, vc_ = kc.cuda(), vc.cuda()
    b.write_kv(key.cuda(), value.cuda(), ok, vc_, slots.cuda(), 0.25)
    ref_kv.write_kv(key, value, kc, vc, slots, 0.25)
    return bitwise(ok, kc)[0] and bitwise(vc_, vc)[0], "bitwise"


def fp8_linear_case(b: RocmBackend) -> tuple[bool, str]:
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(256, 512, generator=g), torch.randn(16, 512, generator=g)
    w_fn, w_s = ref_quant.quantize_fp8(w, torch.float8_e4m3fn, per_token=True)
    w_nuz, s_nuz = b.load_fp8_weight(w_fn, w_s)
    x_q, x_s = ref_quant.quantize_fp8(x, FNUZ, per_token=True)
    y = b.fp8_linear(x_q.cuda(), x_s.cuda(), w_nuz.cuda(), s_nuz.cuda(), None, torch.float32)
    ref = ref_linear.fp8_linear(x_q, x_s, w_fn, w_s, None, torch.float32)
    return close(y, ref, "fp32", x.abs().max().item() * w.abs().max().item(), 512)


def graph_case(b: RocmBackend) -> tuple[bool, str]:
    static = torch.randn(8, 1024, device="cuda")
    weight = torch.ones(512, device="cuda")
    runner = b.capture_graph(lambda: b.rms_norm(b.silu_and_mul(static), weight, 1e-6))
    static.copy_(torch.randn(8, 1024))
    replayed = runner.replay().clone()
    eager = b.rms_norm(b.silu_and_mul(static), weight, 1e-6)
    return torch.equal(replayed, eager), f"graph {b.ran['graph']}"


def main() -> int:
    if not torch.cuda.is_available() or getattr(torch.version, "hip", None):
        print("needs an NVIDIA GPU (this checks the vendor-neutral path on CUDA)", file=sys.stderr)
        return 2
    b = make_backend()
    tune = tuning.attention_tuning(64, False, 128, 4)
    print(f"device {torch.cuda.get_device_name()}; ROCm backend with MI300X profile; tiles "
          f"{tune.block_m}x{tune.block_n}; compile options on this GPU: "
          f"{tuning.compile_options(tune, tuning.target_backend('cuda'))}")  # fmt: skip
    rows, failed = [], 0
    for name, run in cases(b).items():
        try:
            ok, detail = run()
        except Exception as exc:  # a case that raises fails with why
            ok, detail = False, f"raised {type(exc).__name__}: {exc}"
        failed += not ok
        rows.append((name, "pass" if ok else "FAIL", detail))
    width = max(len(r[0]) for r in rows)
    for name, status, detail in rows:
        print(f"{name.ljust(width)}  {status}  {detail}")
    print(f"{len(rows) - failed} passed, {failed} failed; ran: {b.ran}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
