"""The CUDA backend's selection rules on CPU: T4, V100, A100, L40S and H100 described as
`Capabilities` values, the exact reasons each candidate is passed over, and forced choices."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

import backends  # noqa: F401  (declares cpu; `backends.cuda` below declares cuda)
from backends.cpu import linear as ref_linear
from backends.cpu import quant as ref_quant
from backends.cpu.attention import paged_attention
from backends.cuda import candidates as rules
from backends.cuda.backend import CudaBackend
from hal.backend import OP_FAMILIES
from hal.capabilities import Capabilities, LibraryInfo
from hal.registry import REGISTRY, SelectionError
from hal.select import load_backend, select_backend, select_ops

FA2_OK = {"flash_attn": LibraryInfo("flash_attn", "2.7.4", True)}


def nvidia(
    cc: tuple[int, int],
    name: str = "test GPU",
    libraries: dict[str, LibraryInfo] | None = None,
    graph_capture: bool = True,
    source: str = "profile:test",
) -> Capabilities:
    new = cc >= (8, 0)
    return Capabilities(
        vendor="nvidia",
        device_name=name,
        arch=f"sm_{cc[0]}{cc[1]}",
        source=source,
        compute_capability=cc,
        warp_size=32,
        dtypes={
            "fp32": "native",
            "tf32": "native" if new else "none",
            "bf16": "native" if new else "emulated",
            "fp16": "native",
            "fp8_e4m3fn": "native" if cc >= (8, 9) else "emulated",
            "int8": "native",
        },
        fp8_format="e4m3fn" if cc >= (8, 9) else None,
        graph_capture=graph_capture,
        libraries=dict(libraries or {}),
    )


T4 = nvidia((7, 5), "NVIDIA T4")
V100 = nvidia((7, 0), "NVIDIA V100")
A100 = nvidia((8, 0), "NVIDIA A100", FA2_OK)
L40S = nvidia((8, 9), "NVIDIA L40S")
H100 = nvidia((9, 0), "NVIDIA H100", FA2_OK)


@pytest.fixture(autouse=True)
def _no_forced_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's HAL_* variables must not leak into these expectations.
    for family in ("backend", *OP_FAMILIES):
        var = "HAL_BACKEND" if family == "backend" else f"HAL_{family.upper()}_BACKEND"
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("HAL_ALLOW_TF32", raising=False)


def _reasons(family: str, name: str, caps: Capabilities) -> list[str]:
    cand = next(c for c in REGISTRY.candidates(family, "cuda") if c.name == name)
    return cand.check(caps)


# -- the backend ----------------------------------------------------------------------------------
def test_every_family_has_a_candidate_that_runs_on_any_nvidia_gpu() -> None:
    assert set(REGISTRY.families("cuda")) == set(OP_FAMILIES)
    for family in OP_FAMILIES:
        last = REGISTRY.candidates(family, "cuda")[-1]
        assert last.check(nvidia((6, 0))) == [], (family, last.name)


def test_every_candidate_names_an_importable_target() -> None:
    # The conformance suite watches the target's module to confirm which implementation ran.
    for family in OP_FAMILIES:
        for cand in REGISTRY.candidates(family, "cuda"):
            module, _, attr = cand.target.partition(":")
            assert callable(getattr(importlib.import_module(module), attr)), cand


def test_backend_rejects_other_vendors_with_the_device_named() -> None:
    amd = Capabilities(vendor="amd", device_name="AMD Instinct MI300X", arch="gfx942")
    cpu = Capabilities(vendor="cpu", device_name="x86_64 CPU", arch="x86_64")
    assert rules.backend_reasons(amd) == ["no NVIDIA GPU: this device is amd AMD Instinct MI300X"]
    assert rules.backend_reasons(cpu) == ["no NVIDIA GPU: this device is cpu x86_64 CPU"]


def test_profile_is_runnable_without_cuda_torch() -> None:
    # `hal info --profile h100` on a CPU box reports the cuda backend for that device.
    assert rules.backend_reasons(H100) == []
    sel = select_backend(H100)
    assert sel.chosen == "cuda"
    assert "cpu" in sel.not_tried


def test_detected_nvidia_needs_a_cuda_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    detected = nvidia((9, 0), source="detected")
    monkeypatch.setattr(torch.version, "cuda", None)
    (reason,) = rules.backend_reasons(detected)
    assert "built without CUDA (torch.version.cuda is None)" in reason
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rules.backend_reasons(detected) == [
        "torch.cuda.is_available() is False: no usable NVIDIA driver or visible GPU"
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rules.backend_reasons(detected) == []


def test_registration_is_cheap() -> None:
    # Declaring candidates must not import flash_attn or the implementation modules.
    code = (
        "import sys, backends.cuda; "
        "bad = [m for m in ('flash_attn', 'xformers', 'backends.cuda.backend', "
        "'backends.cuda.attention') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- attention ------------------------------------------------------------------------------------
def test_t4_rejects_flash_attn_with_the_exact_reasons() -> None:
    ops = select_ops("cuda", T4)
    assert ops["attention"].chosen == "sdpa"
    assert ops["attention"].rejected["flash_attn"] == [
        "FlashAttention-2 needs compute capability >= 8.0, this is 7.5",
        "flash_attn not installed",
    ]


def test_t4_rejects_flash_attn_on_compute_capability_even_when_installed() -> None:
    t4 = nvidia((7, 5), "NVIDIA T4", FA2_OK)
    assert _reasons("attention", "flash_attn", t4) == [
        "FlashAttention-2 needs compute capability >= 8.0, this is 7.5"
    ]


def test_a100_and_h100_choose_flash_attn_when_installed() -> None:
    for caps in (A100, H100):
        sel = select_ops("cuda", caps)["attention"]
        assert sel.chosen == "flash_attn"
        assert sel.not_tried == ["sdpa"]


def test_h100_without_flash_attn_falls_to_sdpa_naming_why() -> None:
    sel = select_ops("cuda", nvidia((9, 0)))["attention"]
    assert sel.chosen == "sdpa"
    assert sel.rejected == {
        "flash_attn": ["flash_attn not installed"],
        "triton": ["triton not installed"],
    }
    assert "flash_attn flash_attn not installed" in sel.summary()


def test_flash_attn_unusable_or_too_old() -> None:
    broken = {
        "flash_attn": LibraryInfo(
            "flash_attn", "2.7.4", False, "installed, but its CUDA extension does not load"
        )
    }
    assert _reasons("attention", "flash_attn", nvidia((9, 0), libraries=broken)) == [
        "flash_attn installed, but its CUDA extension does not load"
    ]
    old = {"flash_attn": LibraryInfo("flash_attn", "2.5.9.post1", True)}
    (reason,) = _reasons("attention", "flash_attn", nvidia((9, 0), libraries=old))
    assert reason.startswith("flash_attn 2.5.9.post1 is too old") and ">= 2.6" in reason


def test_require_flash_attn_on_t4_raises_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_ATTENTION_BACKEND", "require:flash_attn")
    with pytest.raises(SelectionError) as err:
        select_ops("cuda", T4)
    assert "HAL_ATTENTION_BACKEND" in str(err.value)
    assert "needs compute capability >= 8.0, this is 7.5" in str(err.value)


def test_prefer_flash_attn_on_t4_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_ATTENTION_BACKEND", "prefer:flash_attn")
    sel = select_ops("cuda", T4)["attention"]
    assert sel.chosen == "sdpa"
    assert "fell back" in sel.note and "this is 7.5" in sel.note


def test_require_sdpa_on_h100_overrides_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_ATTENTION_BACKEND", "sdpa")
    sel = select_ops("cuda", H100)["attention"]
    assert sel.chosen == "sdpa" and "required by HAL_ATTENTION_BACKEND" in sel.note


# -- GEMMs and graphs -----------------------------------------------------------------------------
def test_fp8_needs_sm89() -> None:
    for caps, cc in ((T4, "7.5"), (A100, "8.0")):
        sel = select_ops("cuda", caps)["fp8_gemm"]
        assert sel.chosen == "dequant_gemm"
        assert sel.rejected["scaled_mm"] == [
            f"FP8 tensor cores need compute capability >= 8.9, this is {cc}"
        ]
    for caps in (L40S, H100):
        assert select_ops("cuda", caps)["fp8_gemm"].chosen == "scaled_mm"


def test_int8_tensor_cores_need_sm75() -> None:
    assert select_ops("cuda", T4)["int8_gemm"].chosen == "int_mm"
    sel = select_ops("cuda", V100)["int8_gemm"]
    assert sel.chosen == "dequant_gemm"
    assert sel.rejected["int_mm"] == [
        "INT8 tensor cores (torch._int_mm, cuBLASLt) need compute capability >= 7.5, this is 7.0"
    ]


def test_int4_is_the_triton_kernel_with_dequant_gemm_as_fallback() -> None:
    names = [c.name for c in REGISTRY.candidates("int4_gemm", "cuda")]
    assert names == ["triton", "dequant_gemm"]
    triton = {"triton": LibraryInfo("triton", "3.6.0", True)}
    assert select_ops("cuda", nvidia((9, 0), "NVIDIA H100", triton))["int4_gemm"].chosen == "triton"
    v100 = select_ops("cuda", nvidia((7, 0), "NVIDIA V100", triton))["int4_gemm"]
    assert v100.chosen == "dequant_gemm" and v100.rejected["triton"]
    bare = select_ops("cuda", H100)["int4_gemm"]  # no Triton installed
    assert bare.chosen == "dequant_gemm" and bare.rejected["triton"] == ["triton not installed"]


def test_graphs_fall_back_to_eager_without_capture() -> None:
    assert select_ops("cuda", H100)["graph"].chosen == "cuda_graph"
    sel = select_ops("cuda", nvidia((9, 0), "NVIDIA H100", graph_capture=False))["graph"]
    assert sel.chosen == "eager"
    assert sel.rejected["cuda_graph"] == [
        "graph capture is not supported on NVIDIA H100 (capabilities say no)"
    ]


# -- the backend object (constructs without a GPU: no CUDA call happens before an op) ----------
def test_load_backend_for_a_profile_reports_every_family() -> None:
    backend = load_backend(H100)
    assert isinstance(backend, CudaBackend)
    assert {f: backend.chosen(f) for f in ("attention", "fp8_gemm", "int8_gemm", "graph")} == {
        "attention": "flash_attn",
        "fp8_gemm": "scaled_mm",
        "int8_gemm": "int_mm",
        "graph": "cuda_graph",
    }
    lines = backend.describe()
    assert lines[0].startswith("backend: cuda") and len(lines) == 1 + len(OP_FAMILIES)


def test_tf32_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CudaBackend(H100).allow_tf32 is True
    assert CudaBackend(H100).info.settings["tf32"] == "on"
    t4 = CudaBackend(T4)
    assert t4.allow_tf32 is False and t4.info.settings["tf32"] == "off (NVIDIA T4 has no TF32)"
    assert CudaBackend(H100, allow_tf32=False).info.settings["tf32"] == "off (disabled by config)"
    monkeypatch.setenv("HAL_ALLOW_TF32", "0")
    backend = CudaBackend(H100)
    assert not backend.allow_tf32
    assert backend.info.settings["tf32"] == "off (disabled by HAL_ALLOW_TF32)"
    monkeypatch.setenv("HAL_ALLOW_TF32", "maybe")
    with pytest.raises(ValueError, match="HAL_ALLOW_TF32"):
        CudaBackend(H100)


def test_backend_refuses_a_non_cuda_device() -> None:
    with pytest.raises(ValueError, match="not a CUDA device"):
        CudaBackend(H100, "cpu")


def _decode_case(dtype: torch.dtype) -> tuple:
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(8, 16, 2, 64, generator=gen).to(dtype)
    v_cache = torch.randn(8, 16, 2, 64, generator=gen).to(dtype)
    query = torch.randn(2, 4, 64, generator=gen).to(dtype)
    block_tables = torch.tensor([[3, 5], [1, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([20, 7], dtype=torch.int32)
    query_start_loc = torch.tensor([0, 1, 2], dtype=torch.int32)
    return query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, 0.125


def test_flash_attn_input_limits_fall_back_to_sdpa_or_fail_when_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # flash_attn computes in fp16/bf16 only. The SDPA path is plain torch, so the fallback runs
    # here on CPU tensors and is checked against the reference.
    args = _decode_case(torch.float32)
    backend = CudaBackend(H100)
    assert backend.chosen("attention") == "flash_attn"
    out = backend.attention(*args)
    assert backend.ran["attention"] == "sdpa"
    torch.testing.assert_close(out, paged_attention(*args), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("HAL_ATTENTION_BACKEND", "require:flash_attn")
    strict = CudaBackend(H100)
    with pytest.raises(SelectionError, match="float16 or bfloat16 only, query is torch.float32"):
        strict.attention(*args)


def test_fnuz_operands_fall_back_to_dequant_gemm_or_fail_when_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # NVIDIA FP8 tensor cores do not compute AMD's e4m3fnuz; the dequant path (plain torch, so it
    # runs here on CPU tensors) takes those operands and matches the reference exactly.
    fnuz = torch.float8_e4m3fnuz
    gen = torch.Generator().manual_seed(0)
    x_q, x_s = ref_quant.quantize_fp8(torch.randn(5, 32, generator=gen), fnuz, per_token=True)
    w_q, w_s = ref_quant.quantize_fp8(torch.randn(16, 32, generator=gen), fnuz, per_token=True)
    backend = CudaBackend(H100)
    assert backend.chosen("fp8_gemm") == "scaled_mm"
    out = backend.fp8_linear(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    assert backend.ran["fp8_gemm"] == "dequant_gemm"
    ref = ref_linear.fp8_linear(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("HAL_FP8_GEMM_BACKEND", "require:scaled_mm")
    with pytest.raises(SelectionError, match="e4m3fnuz is AMD's encoding"):
        CudaBackend(H100).fp8_linear(x_q, x_s, w_q, w_s, out_dtype=torch.float32)
