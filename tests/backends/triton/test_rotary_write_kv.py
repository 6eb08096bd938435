"""The one-launch rotary (q and k together) and the fused rotary + paged KV write
(`backends.triton.rotary.rotary_write_kv`) against the CPU backend's composition, bit for bit;
how many kernels each launches; and the CUDA backend's choice between fused and composed.

Why bit for bit, with no tolerance: the kernels compute what the reference computes, in the same
order with the same roundings. Each rotated element is x * cos - partner * sin in fp32 with every
product and the sum rounded once (the kernels compile with FMA contraction off, the reference
runs them as separate torch ops), then rounded to nearest even to the input dtype; the cache gets
that returned key and the value, FP8-encoded from one correctly rounded fp32 division by kv_scale
(the reference's `encode_kv`) or rounded to the cache dtype. Under TRITON_INTERPRET=1 (no GPU)
the kernels run on CPU tensors; with a GPU they run natively and the same equalities must hold.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is defined, so it must be set before the kernels import.
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)

from backends.cpu.backend import CpuBackend  # noqa: E402
from hal.select import select_ops  # noqa: E402
from tests.conformance.cases import OPS_BY_NAME  # noqa: E402
from tests.conformance.runner import run_cell  # noqa: E402

for _name in ("backends.triton.kv_cache", "backends.triton.rotary"):
    if _name in sys.modules and INTERPRET:
        importlib.reload(sys.modules[_name])  # imported earlier without the interpreter
tkv = importlib.import_module("backends.triton.kv_cache")
trot = importlib.import_module("backends.triton.rotary")

FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
MAX_POSITION = 2048


@pytest.fixture(scope="module")
def cpu() -> CpuBackend:
    from tests.conformance.targets import fallback_cpu_capabilities

    caps = fallback_cpu_capabilities()
    return CpuBackend(caps, "cpu", select_ops("cpu", caps))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


def assert_bitwise(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    out = out.detach().cpu()
    assert out.dtype == expected.dtype and out.shape == expected.shape, (what, out.dtype, out.shape)
    a = out.contiguous().view(_BITS[out.element_size()])
    b = expected.contiguous().view(_BITS[expected.element_size()])
    diff = a != b
    if bool(diff.any()):
        first = tuple(int(i) for i in diff.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(diff.sum())} of {diff.numel()} differ, first at {first}: "
            f"{out[first].item()} vs {expected[first].item()}"
        )


def cos_sin_cache(rotary_dim: int) -> torch.Tensor:
    from hal.rope import build_cos_sin_cache

    return build_cos_sin_cache(rotary_dim, MAX_POSITION, 10000.0)  # fp32 [max_pos, rotary_dim]


def qkv_views(g, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype):
    """q, k, v as the engine gets them: views into one fused QKV projection output (token stride
    (num_heads + 2 num_kv_heads) * head_dim), with values up to ~4 so rounding is exercised."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = (torch.randn(num_tokens, width, generator=g) * 4).to(dtype)
    kv_width = num_kv_heads * head_dim
    q, k, v = qkv.split([num_heads * head_dim, kv_width, kv_width], dim=-1)
    shape = (num_tokens, -1, head_dim)
    return q.view(shape), k.view(shape), v.view(shape)


def slot_mapping(g, num_tokens: int, num_slots: int, num_padding: int) -> torch.Tensor:
    """Distinct slots in random order, with `num_padding` tokens set to -1 (skipped)."""
    slots = torch.randperm(num_slots, generator=g)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=g)[:num_padding]] = -1
    return slots


# -- rotary: q and k in one launch -----------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "rotary_dim"),
    [(6, 2, 80, 80), (4, 1, 64, 32), (8, 8, 96, 48)],  # GQA, MQA with partial rotary, MHA
)
def test_rotary_matches_reference_bitwise(
    cpu, dtype: str, is_neox: bool, num_heads: int, num_kv_heads: int, head_dim: int,
    rotary_dim: int,
) -> None:  # fmt: skip
    g = gen(num_heads * 100 + rotary_dim)
    q, k, _ = qkv_views(g, 11, num_heads, num_kv_heads, head_dim, FLOATS[dtype])
    positions = torch.randint(0, MAX_POSITION, (11,), generator=g)
    cache = cos_sin_cache(rotary_dim)
    q_out, k_out = trot.rotary(dev(positions), dev(q), dev(k), dev(cache), is_neox)
    q_ref, k_ref = cpu.rotary(positions, q, k, cache, is_neox)
    assert_bitwise(q_out, q_ref, "query")
    assert_bitwise(k_out, k_ref, "key")


# -- the fused op ----------------------------------------------------------------------------
CACHE_CASES = [
    # (input dtype, cache dtype, kv_scale)
    ("bf16", torch.bfloat16, None),
    ("fp16", torch.float16, None),
    ("fp32", torch.float32, None),
    ("bf16", torch.float32, None),  # rotated key rounded to bf16 first, then widened
    ("fp32", torch.bfloat16, None),  # and rounded again, to the cache
    ("bf16", torch.float8_e4m3fn, 0.05),  # stored = fp8(k / kv_scale)
    ("fp16", torch.float8_e4m3fnuz, 2.0),  # ROCm's format: no negative zero, max 240
    ("fp32", torch.float8_e5m2, None),  # kv_scale defaults to 1.0
]


@pytest.mark.parametrize(
    ("dtype", "cache_dtype", "kv_scale"),
    CACHE_CASES,
    ids=[f"{d}-{str(c).removeprefix('torch.')}" for d, c, _ in CACHE_CASES],
)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotary_write_kv_matches_cpu_composition(
    cpu, dtype: str, cache_dtype: torch.dtype, kv_scale: float | None, is_neox: bool
) -> None:
    num_tokens, num_heads, num_kv_heads, head_dim = 13, 8, 2, 80
    rotary_dim = 80 if is_neox else 40  # full and partial rotary_dim
    g = gen(len(CACHE_CASES) * is_neox + CACHE_CASES.index((dtype, cache_dtype, kv_scale)))
    q, k, v = qkv_views(g, num_tokens, num_heads, num_kv_heads, head_dim, FLOATS[dtype])
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=g)
    cache = cos_sin_cache(rotary_dim)
    num_blocks, block_size = 5, 4
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = (torch.randn(shape, generator=g) * 3).to(cache_dtype)
    value_cache = (torch.randn(shape, generator=g) * 3).to(cache_dtype)
    slots = slot_mapping(g, num_tokens, num_blocks * block_size, num_padding=3)
    kc, vc = dev(key_cache.clone()), dev(value_cache.clone())
    q_out, k_out = trot.rotary_write_kv(dev(positions), dev(q), dev(k), dev(v), dev(cache),
                                        is_neox, kc, vc, dev(slots), kv_scale)  # fmt: skip
    ref_kc, ref_vc = key_cache.clone(), value_cache.clone()
    # Backend.rotary_write_kv's default body: rotary, then write_kv of the rotated key.
    q_ref, k_ref = cpu.rotary_write_kv(positions, q, k, v, cache, is_neox, ref_kc, ref_vc,
                                       slots, kv_scale)  # fmt: skip
    assert_bitwise(q_out, q_ref, "query")
    assert_bitwise(k_out, k_ref, "key")
    assert_bitwise(kc, ref_kc, "key_cache")
    assert_bitwise(vc, ref_vc, "value_cache")
    # The padding tokens' slots were skipped: every other slot kept its old contents.
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    flat = kc.cpu().view(-1, num_kv_heads, head_dim)[untouched]
    assert_bitwise(flat, key_cache.view(-1, num_kv_heads, head_dim)[untouched], "skipped slots")


def test_rotary_write_kv_decode_shape_and_empty_batch(cpu) -> None:
    # One decode token (the Llama-3-8B head layout: 32 q heads, 8 KV heads, head_dim 128), a
    # slot past the cache (skipped, as the Triton write_kv skips it), and zero tokens.
    g = gen(7)
    q, k, v = qkv_views(g, 2, 32, 8, 128, torch.bfloat16)
    positions, cache = torch.tensor([5, 1999]), cos_sin_cache(128)
    key_cache = torch.zeros(3, 16, 8, 128, dtype=torch.bfloat16)
    kc, vc = dev(key_cache.clone()), dev(key_cache.clone())
    slots = torch.tensor([37, 48])  # 48 = num_blocks * block_size: outside the cache
    q_out, k_out = trot.rotary_write_kv(dev(positions), dev(q), dev(k), dev(v), dev(cache), True,
                                        kc, vc, dev(slots))  # fmt: skip
    ref_kc, ref_vc = key_cache.clone(), key_cache.clone()
    q_ref, k_ref = cpu.rotary_write_kv(positions[:1], q[:1], k[:1], v[:1], cache, True, ref_kc,
                                       ref_vc, slots[:1])  # fmt: skip
    assert_bitwise(q_out[:1], q_ref, "query")
    assert_bitwise(kc, ref_kc, "key_cache")
    assert_bitwise(vc, ref_vc, "value_cache")
    empty = [dev(t[:0]) for t in (positions, q, k, v)]
    q0, k0 = trot.rotary_write_kv(*empty, dev(cache), True, kc, vc, dev(slots[:0]))
    assert q0.shape == (0, 32, 128) and k0.shape == (0, 8, 128)


def test_bad_inputs_name_the_value() -> None:
    q, k = dev(torch.zeros(3, 4, 8)), dev(torch.zeros(3, 2, 8))
    cache, pos = dev(torch.zeros(16, 8)), dev(torch.zeros(3, dtype=torch.long))
    kc = dev(torch.zeros(2, 4, 2, 8))
    slots = dev(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"value: shape \(3, 1, 8\), expected"):
        trot.rotary_write_kv(pos, q, k, dev(torch.zeros(3, 1, 8)), cache, True, kc, kc, slots)
    with pytest.raises(ValueError, match="slot_mapping: expected an integer"):
        trot.rotary_write_kv(pos, q, k, k, cache, True, kc, kc, slots.float())
    with pytest.raises(ValueError, match="kv_scale: 0.0 must be > 0"):
        fp8 = kc.to(torch.float8_e4m3fn)
        trot.rotary_write_kv(pos, q, k, k, cache, True, fp8, fp8.clone(), slots, 0.0)
    with pytest.raises(ValueError, match="must be contiguous"):
        wide = dev(torch.zeros(2, 4, 2, 16))[..., :8]
        trot.rotary_write_kv(pos, q, k, k, cache, True, wide, wide, slots)
    with pytest.raises(ValueError, match="rotary_dim 10 must be even and <= head_dim 8"):
        trot.rotary_write_kv(pos, q, k, k, dev(torch.zeros(16, 10)), True, kc, kc, slots)


# -- launches --------------------------------------------------------------------------------
class _CountLaunches:
    """Stands in for a kernel: counts `kernel[grid](...)` launches and keeps the last one's
    keyword arguments, then launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches, self.kwargs = kernel, 0, {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            self.kwargs = kwargs
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_one_launch_each(monkeypatch) -> None:
    rot = _CountLaunches(trot._rotary_kernel)
    write = _CountLaunches(tkv._write_kv_kernel)
    monkeypatch.setattr(trot, "_rotary_kernel", rot)
    monkeypatch.setattr(tkv, "_write_kv_kernel", write)
    g = gen(3)
    q, k, v = (dev(t) for t in qkv_views(g, 1, 4, 2, 64, torch.float16))
    pos, cache = dev(torch.tensor([9])), dev(cos_sin_cache(64))
    trot.rotary(pos, q, k, cache)
    assert rot.launches == 1  # q and k together
    assert rot.kwargs["enable_fp_fusion"] is False  # no FMA: the reference's roundings on a GPU
    kc = dev(torch.zeros(2, 4, 2, 64, dtype=torch.float16))
    trot.rotary_write_kv(pos, q, k, v, cache, True, kc, kc.clone(), dev(torch.tensor([3])))
    assert (rot.launches, write.launches) == (2, 0)


# -- GPU compilation, without a GPU ----------------------------------------------------------
# The interpreter runs kernels as Python, so it accepts code the GPU compiler rejects (a name
# bound with different types in the branches of a runtime `if`). Compile for sm_90 and gfx942
# ahead of time (Triton ships ptxas and lld) in a process without TRITON_INTERPRET, and check
# the PTX has no FMA: the bit-for-bit claim rests on separately rounded products and sums.
_COMPILE = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from backends.triton import rotary
from backends.triton.quant import fp8_codec

ptrs = dict(q_ptr="bf16", k_ptr="bf16", v_ptr="bf16", q_out_ptr="bf16", k_out_ptr="bf16",
            key_cache_ptr="u8", value_cache_ptr="u8", positions_ptr="i64", cos_sin_ptr="fp32",
            slot_mapping_ptr="i64")
fn = rotary._rotary_kernel
for target in (GPUTarget("cuda", 90, 32), GPUTarget("hip", "gfx942", 64)):
    for write in (False, True):
        consts = dict(IS_NEOX=write, WRITE_KV=write, IS_FP8=write, INTERPRET=False, BLOCK_T=1,
                      BLOCK_HQ=32, BLOCK_HKV=8, BLOCK_D=128, PDL=target.backend == "cuda",
                      EARLY=write,  # HAL_ROTARY_EARLY: cos / sin before the PDL wait
                      **fp8_codec(torch.float8_e4m3fnuz))
        sig = {n: ("*" + ptrs[n] if n in ptrs else "constexpr" if n in consts else "i32")
               for n in fn.arg_names}
        sig["kv_scale"] = "fp32"
        k = triton.compile(ASTSource(fn, sig, consts), target=target,
                           options={"enable_fp_fusion": False})
        if target.backend == "cuda":
            assert "fma.rn.f32" not in k.asm["ptx"], "FMA contraction in the rotary kernel"
print("compiled")
"""


def test_kernel_compiles_for_gpus_without_fma() -> None:
    import subprocess
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", _COMPILE], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# -- the CUDA backend: fused when rotary and kv_write both chose Triton ----------------------
def _cuda_backend(monkeypatch, **forced: str):
    import backends.cuda as cuda_pkg
    from backends.cuda.backend import CudaBackend
    from hal.backend import OP_FAMILIES

    for family in OP_FAMILIES:
        monkeypatch.delenv(f"HAL_{family.upper()}_BACKEND", raising=False)
    for family, name in forced.items():
        monkeypatch.setenv(f"HAL_{family.upper()}_BACKEND", f"require:{name}")
    if INTERPRET:
        return CudaBackend(cuda_pkg.interpreter_capabilities(), "cpu")
    from platforms import detect

    caps = detect()
    if caps.vendor != "nvidia":
        pytest.skip(f"the CUDA backend needs an NVIDIA GPU here, found {caps.vendor}")
    return CudaBackend(caps, "cuda")


def _layer_inputs(dtype=torch.bfloat16, cache_dtype=torch.bfloat16):
    g = gen(11)
    q, k, v = (dev(t) for t in qkv_views(g, 5, 4, 2, 64, dtype))
    pos, cache = dev(torch.randint(0, MAX_POSITION, (5,), generator=g)), dev(cos_sin_cache(32))
    kc = dev(torch.zeros(3, 4, 2, 64).to(cache_dtype))
    slots = dev(torch.tensor([0, 5, -1, 11, 2]))
    return pos, q, k, v, cache, kc, kc.clone(), slots


def test_cuda_backend_fuses_when_both_choose_triton(cpu, monkeypatch) -> None:
    backend = _cuda_backend(monkeypatch)
    assert backend.chosen("rotary") == backend.chosen("kv_write") == "triton"
    assert backend.info.settings["rotary_write_kv"] == "fused (triton, one launch)"
    rot = _CountLaunches(trot._rotary_kernel)
    monkeypatch.setattr(trot, "_rotary_kernel", rot)
    pos, q, k, v, cache, kc, vc, slots = _layer_inputs(cache_dtype=torch.float8_e4m3fn)
    q_out, k_out = backend.rotary_write_kv(pos, q, k, v, cache, False, kc, vc, slots, 0.5)
    assert rot.launches == 1
    assert backend.ran["rotary"] == backend.ran["kv_write"] == "triton"
    ref = [torch.zeros_like(t.cpu()) for t in (kc, vc)]  # what the caches held before
    q_ref, k_ref = cpu.rotary_write_kv(pos.cpu(), q.cpu(), k.cpu(), v.cpu(), cache.cpu(), False,
                                       *ref, slots.cpu(), 0.5)  # fmt: skip
    names, outs = ("query", "key", "key_cache", "value_cache"), (q_out, k_out, kc, vc)
    for name, out, expected in zip(names, outs, (q_ref, k_ref, *ref), strict=True):
        assert_bitwise(out, expected, name)


def test_cuda_backend_composes_otherwise(monkeypatch) -> None:
    # kv_write forced to torch: rotary (Triton) then write_kv (torch), and the info line says so.
    backend = _cuda_backend(monkeypatch, kv_write="torch")
    assert backend.info.settings["rotary_write_kv"] == "rotary (triton) then kv_write (torch)"
    pos, q, k, v, cache, kc, vc, slots = _layer_inputs()
    fused = _cuda_backend(monkeypatch)
    kc2, vc2 = kc.clone(), vc.clone()
    q_out, k_out = backend.rotary_write_kv(pos, q, k, v, cache, True, kc, vc, slots)
    assert (backend.ran["rotary"], backend.ran["kv_write"]) == ("triton", "torch")
    q2, k2 = fused.rotary_write_kv(pos, q, k, v, cache, True, kc2, vc2, slots)
    for name, out, expected in (("query", q_out, q2), ("key", k_out, k2), ("key_cache", kc, kc2),
                                ("value_cache", vc, vc2)):  # fmt: skip
        assert_bitwise(out, expected.cpu(), f"{name}: composed vs fused")
    # Inputs the Triton kernels cannot take (float64) go the composed way, through torch.
    d = [t.double() if t.is_floating_point() else t for t in (pos, q, k, v)]
    kc64 = dev(torch.zeros(3, 4, 2, 64, dtype=torch.float64))
    fused.rotary_write_kv(*d, cache, True, kc64, kc64.clone(), slots)
    assert (fused.ran["rotary"], fused.ran["kv_write"]) == ("torch", "torch")


# -- the conformance row can fail ------------------------------------------------------------
class _WritesUnrotatedKey(CpuBackend):
    def rotary_write_kv(self, positions, query, key, value, cos_sin_cache, is_neox, key_cache,
                        value_cache, slot_mapping, kv_scale=None):  # fmt: skip
        q, k = self.rotary(positions, query, key, cos_sin_cache, is_neox)
        self.write_kv(key, value, key_cache, value_cache, slot_mapping, kv_scale)
        return q, k


def test_conformance_row_catches_a_cache_of_unrotated_keys() -> None:
    from tests.conformance.targets import fallback_cpu_capabilities

    caps = fallback_cpu_capabilities()
    backend = _WritesUnrotatedKey(caps, "cpu", select_ops("cpu", caps))
    cell = run_cell(backend, OPS_BY_NAME["rotary_write_kv"], "fp32", "ci", max_examples=5,
                    shrink=False)  # fmt: skip
    assert cell.status == "fail" and "key_cache" in cell.reason, cell.report()
    honest = CpuBackend(caps, "cpu", select_ops("cpu", caps))
    cell = run_cell(honest, OPS_BY_NAME["rotary_write_kv"], "bf16", "ci", max_examples=5)
    assert cell.status == "pass" and cell.cases == 5, cell.report()
