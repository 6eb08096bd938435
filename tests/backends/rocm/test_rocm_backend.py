"""The ROCm backend under the Triton interpreter with the MI300X profile, against the CPU reference:
AMD tiles, compile options only on HIP, FP8 e4m3fnuz (and e4m3fn checkpoints re-encoded for it),
ROCm detection, selection reasons, and a tiny model end to end."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton")

import backends.rocm as rocm_pkg  # noqa: E402
import platforms  # noqa: E402
from backends.cpu import attention as ref_attention  # noqa: E402
from backends.cpu import linear as ref_linear  # noqa: E402
from backends.cpu import quant as ref_quant  # noqa: E402
from backends.rocm import candidates as rules  # noqa: E402
from backends.rocm import fp8, tuning  # noqa: E402
from hal.report import build_report  # noqa: E402
from hal.select import load_backend  # noqa: E402
from platforms import rocm as rocm_platform  # noqa: E402
from tests.conformance import strategies as S  # noqa: E402
from tests.conformance.tolerances import tolerance  # noqa: E402

F64 = torch.float64
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="interpreter capabilities, CPU run")


@pytest.fixture(scope="module")
def caps():
    return rocm_pkg.interpreter_capabilities()


@pytest.fixture(scope="module")
def backend(caps):
    if not INTERPRET:
        pytest.skip("the interpreter capabilities build a CPU backend; this run is native")
    return load_backend(caps, device="cpu", configured="require:rocm")


# -- selection -----------------------------------------------------------------------------------
def test_interpreter_caps_are_mi300x_and_select_rocm(caps, backend) -> None:
    assert caps.arch == "gfx942" and caps.warp_size == 64 and caps.fp8_format == "e4m3fnuz"
    assert backend.name == "rocm" and backend.fp8_dtype == torch.float8_e4m3fnuz
    for family in ("kv_write", "attention", "quantize", "rms_norm", "rotary", "activation"):
        assert backend.chosen(family) == "triton", backend.describe()
    assert backend.chosen("fp8_gemm") == "dequant_gemm"  # no hipBLASLt on CPU tensors
    assert backend.chosen("graph") == "eager"
    assert backend.info.settings["collective"].startswith("rccl")
    assert caps.collective_backend == "nccl"  # torch.distributed's name for RCCL on ROCm
    assert backend.info.settings["fp8_format"] == "e4m3fnuz (max 240)"


def test_hal_info_mi300x_reports_rocm_choices_and_reasons() -> None:
    report = build_report(platforms.load_profile("mi300x"))
    assert report["backends"]["chosen"] == "rocm"
    attention = report["ops"]["attention"]
    reasons = {c["name"]: c["reasons"] for c in attention["candidates"]}
    assert any("flash_attn" in r for r in reasons["flash_attn_ck"])
    assert report["ops"]["fp8_gemm"]["chosen"] == "hipblaslt_fp8"
    assert report["ops"]["graph"]["chosen"] == "hip_graph"


def test_mi250x_has_no_fp8_gemm_and_says_why() -> None:
    caps = platforms.load_profile("mi250x")
    (why,) = rules.hipblaslt_fp8_reasons(caps)
    assert "gfx90a" in why and "gfx942" in why
    with pytest.raises(fp8.Fp8UnsupportedError, match=r"gfx90a.*needs gfx942"):
        fp8.fp8_dtype_for(caps)
    w = torch.zeros(4, 8).to(torch.float8_e4m3fn)
    with pytest.raises(fp8.Fp8UnsupportedError, match="MI250X"):
        fp8.load_fp8_weight(caps, w, torch.ones(1))


def test_fp8_format_per_arch() -> None:
    assert fp8.fp8_dtype_for(platforms.load_profile("mi355x")) == torch.float8_e4m3fn
    mi300 = platforms.load_profile("mi300x")
    assert fp8.fp8_dtype_for(mi300, "fp8") == torch.float8_e4m3fnuz
    with pytest.raises(fp8.Fp8UnsupportedError, match="reencode_e4m3fn_to_fnuz"):
        fp8.fp8_dtype_for(mi300, "e4m3fn")
    with pytest.raises(ValueError, match="'e3m4' is not one of"):
        fp8.fp8_dtype_for(mi300, "e3m4")


# -- compile options -----------------------------------------------------------------------------
def test_amd_options_only_for_hip() -> None:
    tune = tuning.attention_tuning(64, fp32=False, head_dim_p2=128, group=4)
    assert (tune.block_m, tune.block_n, tune.waves_per_eu, tune.matrix_instr_nonkdim) == (
        64, 64, 2, 16,
    )  # fmt: skip
    hip = tuning.compile_options(tune, "hip")
    assert hip["waves_per_eu"] == 2 and hip["matrix_instr_nonkdim"] == 16
    assert tuning.compile_options(tune, "cuda") == {"num_warps": 4, "num_stages": 1}
    assert tuning.compile_options(tune, None) == {}
    if INTERPRET:
        assert tuning.target_backend("cpu") is None and tuning.target_backend("cuda") is None
    assert tuning.attention_tuning(64, True, 256, 16).block_m == 64  # wide: more keys halved
    assert tuning.attention_tuning(64, False, 64, 128).block_m == 128  # holds the whole group
    # Decode launches: CDNA (64 lanes) its own one-stage tiles, RDNA (32) the NVIDIA table's
    # entry for GPUs without sm_90's shared memory.
    assert tuning.amd_decode_config(64, 128, torch.bfloat16).num_stages == 1
    assert tuning.amd_decode_config(64, 256, torch.bfloat16).block_n == 32

    # (compared by fields: other test modules reload the kernel modules, and with them the class)
    def fields(cfg):
        return (cfg.block_n, cfg.num_warps, cfg.num_stages)

    table = tuning.DECODE_CONFIGS
    rdna = tuning.amd_decode_config(32, 128, torch.float16)
    assert fields(rdna) == fields(table[("narrow", "small_smem")])
    assert fields(tuning.amd_decode_config(32, 64, torch.float32)) == fields(
        table[("wide", "small_smem")]
    )


# -- attention with the AMD tiles against the reference ------------------------------------------
def _batch(seed: int, dtype: str, cache_dtype: str, query_lens=None) -> S.AttentionBatch:
    g = torch.Generator().manual_seed(seed)
    seq_lens = tuple(int(v) for v in torch.randint(1, 70, (4,), generator=g))
    query_lens = query_lens or (1, seq_lens[1], max(1, seq_lens[2] // 3), 1)
    num_blocks = sum(-(-n // 16) for n in seq_lens) + 2
    order = tuple(int(v) for v in torch.randperm(num_blocks, generator=g))
    return S.AttentionBatch(
        dtype=dtype, cache_dtype=cache_dtype, num_kv_heads=2, gqa_ratio=4, head_dim=80,
        block_size=16, seq_lens=seq_lens, query_lens=query_lens, num_blocks=num_blocks,
        block_order=order, sliding_window=None, soft_cap=None,
        kv_scale=0.5 if cache_dtype.startswith("fp8") else None, score_scale=1.0,
        num_padding=0, seed=seed,
    )  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize(
    ("dtype", "cache_dtype", "decode"),
    [("fp32", "fp32", False), ("bf16", "bf16", False), ("fp16", "fp8_e4m3fnuz", False),
     ("bf16", "bf16", True), ("fp32", "fp8_e4m3fnuz", True)],
)  # fmt: skip
def test_attention_amd_tiles_match_reference(dtype: str, cache_dtype: str, decode: bool) -> None:
    from backends.rocm import attention as rocm_attention

    case = _batch(7, dtype, cache_dtype, (1, 1, 1, 1) if decode else None)
    if not decode:
        case = dataclasses.replace(case, sliding_window=9, soft_cap=20.0)
    t = case.build()
    names = ("query", "key_cache", "value_cache", "block_tables", "seq_lens", "query_start_loc")
    args = (*(t[n] for n in names), 0.11, case.sliding_window, case.soft_cap, case.kv_scale)
    out = rocm_attention.attention(*args, warp_size=64, amd_tiles=True)
    ref = ref_attention.paged_attention(t["query"].to(F64), *args[1:])
    allowed = tolerance(dtype).allowed(ref, t["value"].abs().max().item(), max(case.seq_lens))
    err = (out.to(F64) - ref).abs()
    assert bool((err <= allowed).all()), f"max err {err.max().item():.3g}"


# -- FP8 e4m3fnuz --------------------------------------------------------------------------------
def test_reencode_every_e4m3fn_code_keeps_its_value() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    scale = torch.tensor([0.37])
    q, s = fp8.reencode_e4m3fn_to_fnuz(codes.reshape(16, 16), scale)
    assert q.dtype == torch.float8_e4m3fnuz and s.item() == pytest.approx(0.74)
    want = ref_quant.dequantize_fp8(codes.reshape(16, 16), scale, torch.float64)
    got = ref_quant.dequantize_fp8(q, s, torch.float64)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())  # -0 became +0: equal as values
    assert not (q.view(torch.uint8) == 0x80).logical_and(~want.isnan()).any()
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.reencode_e4m3fn_to_fnuz(q, scale)


@needs_interpreter
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fnuz_quantize_dequantize_bitwise(backend, per_token: bool, dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(13, 72, generator=g) * 40).to(dtype)
    q, s = backend.quantize_fp8(x, torch.float8_e4m3fnuz, per_token=per_token)
    assert backend.ran["quantize"] == "triton"
    q_ref, s_ref = ref_quant.quantize_fp8(x, torch.float8_e4m3fnuz, per_token=per_token)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert q.to(torch.float32).abs().max().item() <= 240.0
    y = backend.dequantize_fp8(q, s, dtype)
    assert torch.equal(y, ref_quant.dequantize_fp8(q_ref, s_ref, dtype))


@needs_interpreter
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_e4m3fn_checkpoint_on_fnuz_gives_the_reference_gemm(backend, out_dtype) -> None:
    g = torch.Generator().manual_seed(11)
    w = torch.randn(24, 64, generator=g)
    x = torch.randn(5, 64, generator=g)
    w_fn, w_scale = ref_quant.quantize_fp8(w, torch.float8_e4m3fn, per_token=True)  # checkpoint
    w_fn[0, :4] = torch.tensor([-0.0, 0.0, -0.0, 448.0]).to(torch.float8_e4m3fn)  # -0 and max
    w_nuz, s_nuz = backend.load_fp8_weight(w_fn, w_scale)
    assert w_nuz.dtype == torch.float8_e4m3fnuz and torch.equal(s_nuz, w_scale * 2)
    x_q, x_scale = backend.quantize_fp8(x, torch.float8_e4m3fnuz, per_token=True)
    out = backend.fp8_linear(x_q, x_scale, w_nuz, s_nuz, None, out_dtype)
    assert backend.ran["fp8_gemm"] == "dequant_gemm"
    # The reference on the original e4m3fn weights: halved values times doubled scales are exact.
    ref = ref_linear.fp8_linear(x_q, x_scale, w_fn, w_scale, None, out_dtype)
    assert torch.equal(out, ref)


# -- ROCm detection -------------------------------------------------------------------------------
def _fake_rocm(monkeypatch, gcn: str, name: str) -> None:
    props = types.SimpleNamespace(
        name=name, gcnArchName=gcn, total_memory=192 << 30, multi_processor_count=304
    )
    monkeypatch.setattr(torch.version, "hip", "6.4.1", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # not installed: torch answers
    monkeypatch.setattr(rocm_platform.importlib.util, "find_spec", lambda n: None)


@pytest.mark.parametrize(
    ("gcn", "name", "arch", "fp8_format"),
    [("gfx942:sramecc+:xnack-", "AMD Instinct MI300X", "gfx942", "e4m3fnuz"),
     ("gfx90a:sramecc+:xnack-", "AMD Instinct MI250X", "gfx90a", None),
     ("gfx950", "AMD Instinct MI355X", "gfx950", "e4m3fn")],
)  # fmt: skip
def test_detect_parses_gcn_arch_name(monkeypatch, gcn, name, arch, fp8_format) -> None:
    _fake_rocm(monkeypatch, gcn, name)
    probe = rocm_platform.RocmPlatform().probe()
    assert probe.usable, probe
    caps = rocm_platform.RocmPlatform().capabilities()
    assert (caps.arch, caps.fp8_format, caps.warp_size) == (arch, fp8_format, 64)
    assert caps.runtime_version == "6.4.1" and caps.peak_tflops  # a profile matched
    assert any("torch (gcnArchName)" in n for n in caps.notes)


@pytest.mark.parametrize(
    ("gcn", "arch", "warning"),
    [("gfx1201", "gfx1201", "no profile matches"), ("sm_90?", "unknown", "not of the form")],
)
def test_unknown_arch_reports_with_a_warning(monkeypatch, caplog, gcn, arch, warning) -> None:
    _fake_rocm(monkeypatch, gcn, "AMD Radeon Mystery")
    caps = rocm_platform.RocmPlatform().capabilities()
    assert caps.arch == arch and caps.vendor == "amd" and caps.device_name == "AMD Radeon Mystery"
    assert any(warning in n for n in caps.notes), caps.notes
    assert caps.memory_bytes == 192 << 30 and not math.isnan(caps.compute_units)
    report = build_report(caps)  # the report renders; no crash
    assert report["device"]["arch"] == arch
