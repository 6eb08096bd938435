"""The PTX-dequantizing 4-bit GEMM (`backends.triton.int4_gemv_asm`) against
x @ dequantize_packed(p).T in float64: under TRITON_INTERPRET=1 without a GPU (the asm replaced
by plain Triton ops, whose values the PTX must equal: the generated PTX text is checked by a small
emulator of its five instructions), and the real asm path on an NVIDIA GPU at the Llama-3-8B MLP
shapes' K.

Tolerance: the kernel's products x * (q - z) are exact, accumulation is fp32, the group scale is
one fp32 multiply per tile partial, then one rounding to x's dtype. So |y - ref| <= u * |ref|
(the final round to nearest, u of x's dtype) + K * 2^-23 * (|x| @ |W|.T) (a worst-case bound of
fp32 accumulation, tensor cores' truncating adders included: 2^-23 per add) + the smallest
subnormal. A wrong nibble order or magic constant is off by about |W| per term, orders above it.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

pytest.importorskip("triton")

from tests.conformance.tolerances import DTYPE_NAME, SUBNORMAL_MIN, UNIT_ROUNDOFF  # noqa: E402

for _name in ("backends.triton.int4_gemm", "backends.triton.int4_gemv_asm"):
    if _name in sys.modules and INTERPRET:
        importlib.reload(sys.modules[_name])  # defined without the interpreter
ig = importlib.import_module("backends.triton.int4_gemm")
ga = importlib.import_module("backends.triton.int4_gemv_asm")

F64 = torch.float64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_packed(
    n: int, k: int, group_size: int, scale_dtype=torch.bfloat16, seed: int = 0, device=DEVICE
) -> ig.Int4Packed:
    """A random canonical int4 weight (every bit of qweight random), repacked."""
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31, (k // 8, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group_size, n, generator=gen) * 0.05 + 0.005).to(scale_dtype)
    zeros = torch.randint(0, 16, (k // group_size, n), generator=gen, dtype=torch.uint8)
    p = ig.repack_int4_for_triton(qweight, scales, zeros, group_size)
    return ig.Int4Packed(p.qweight.to(device), p.scales.to(device), p.zeros.to(device),
                         p.group_size)  # fmt: skip


def check(y: torch.Tensor, x: torch.Tensor, p: ig.Int4Packed, bias=None) -> None:
    """y against x @ dequantize_packed(p).T (+ bias) in float64, the bound of the docstring."""
    w = ig.dequantize_packed(p).to(F64).cpu()  # [N, K] checkpoint order
    xd = x.to(F64).cpu()
    ref = xd @ w.t()
    if bias is not None:
        ref = ref + bias.to(F64).cpu()
    assert y.dtype == x.dtype and tuple(y.shape) == tuple(ref.shape)
    k = x.shape[1]
    u = UNIT_ROUNDOFF[DTYPE_NAME[x.dtype]]
    allowed = u * ref.abs() + k * 2.0**-23 * (xd.abs() @ w.abs().t()) + SUBNORMAL_MIN[
        DTYPE_NAME[x.dtype]]  # fmt: skip
    err = (y.cpu().to(F64) - ref).abs()
    worst = float((err / allowed).max())
    assert worst <= 1.0, f"max |y - ref| = {float(err.max()):.3g}, {worst:.2f}x the bound"


# -- the PTX, emulated -------------------------------------------------------------------------
def _half_bits_to_f64(bits: torch.Tensor, kind: str) -> torch.Tensor:
    dtype = DTYPES[kind]
    return bits.to(torch.int16).view(dtype).to(F64)  # int16 keeps the low 16 bits


def _f64_to_half_bits(v: torch.Tensor, kind: str) -> torch.Tensor:
    return v.to(DTYPES[kind]).view(torch.int16).to(torch.int64) & 0xFFFF  # round to nearest even


def emulate_ptx(asm: str, words: torch.Tensor, zneg: torch.Tensor) -> list[torch.Tensor]:
    """Runs the dequantize block (mov, shr.u32, lop3.b32, fma.rn.{f16x2,bf16x2}, unpacking mov)
    on int64 tensors holding 32-bit patterns; returns the 16-bit outputs $0..$7."""
    regs: dict[str, torch.Tensor] = {"$8": words & 0xFFFFFFFF, "$9": zneg & 0xFFFFFFFF}

    def val(op: str) -> torch.Tensor:
        op = op.strip()
        return regs[op] if op in regs else torch.full_like(words, int(op, 0))

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        opcode, rest = line.split(None, 1)
        if opcode == "mov.b32" and rest.startswith("{"):
            lo, hi, src = re.fullmatch(r"\{(\S+), (\S+)\}, (\S+)", rest).groups()
            regs[lo], regs[hi] = val(src) & 0xFFFF, (val(src) >> 16) & 0xFFFF
            continue
        dst, *ops = [o.strip() for o in rest.split(",")]
        if opcode == "mov.b32":
            regs[dst] = val(ops[0])
        elif opcode == "shr.u32":
            regs[dst] = val(ops[0]) >> int(ops[1], 0)
        elif opcode == "lop3.b32":
            a, b, c = (val(o) for o in ops[:3])
            lut, out = int(ops[3], 0), torch.zeros_like(words)
            for i in range(8):  # minterm i: a = bit 2, b = bit 1, c = bit 0 (0xF0, 0xCC, 0xAA)
                if lut >> i & 1:
                    pick = [t if i >> s & 1 else ~t for t, s in ((a, 2), (b, 1), (c, 0))]
                    out |= pick[0] & pick[1] & pick[2]
            regs[dst] = out & 0xFFFFFFFF
        elif opcode in ("fma.rn.f16x2", "fma.rn.bf16x2"):
            kind = "fp16" if opcode == "fma.rn.f16x2" else "bf16"
            a, b, c = (val(o) for o in ops)
            halves = []
            for shift in (0, 16):
                fa, fb, fc = (_half_bits_to_f64(t >> shift & 0xFFFF, kind) for t in (a, b, c))
                halves.append(_f64_to_half_bits(fa * fb + fc, kind) << shift)  # a*b+c exact here
            regs[dst] = halves[0] | halves[1]
        else:
            raise AssertionError(f"the emulator does not know {opcode!r}")
    return [regs[f"${i}"] for i in range(8)]


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_ptx_gives_q_minus_z_for_every_nibble(kind: str) -> None:
    # Every nibble value at every position (words i * 0x11111111 and 0x76543210-style ramps),
    # random words, and every zero point: output i must be nibble i minus z, exactly.
    gen = torch.Generator().manual_seed(1)
    words = torch.cat([
        torch.arange(16, dtype=torch.int64) * 0x11111111,
        torch.tensor([0x76543210, 0xFEDCBA98, 0x0F0F0F0F, 0xF0F0F0F0]),
        torch.randint(0, 2**32, (200,), generator=gen, dtype=torch.int64),
    ])  # fmt: skip
    dtype = DTYPES[kind]
    for z in range(16):
        zh = ga.neg_magic(dtype) | z
        zneg = torch.full_like(words, zh | zh << 16)
        magic = {"fp16": 1024.0, "bf16": 128.0}[kind]
        assert float(_half_bits_to_f64(torch.tensor(ga.MAGIC[kind]), kind)) == magic
        assert float(_half_bits_to_f64(torch.tensor(zh), kind)) == -(magic + z)
        outs = emulate_ptx(ga.dequant_asm(kind), words, zneg)
        for i, out in enumerate(outs):
            want = ((words >> (4 * i)) & 0xF) - z
            got = _half_bits_to_f64(out, kind)
            assert torch.equal(got, want.to(F64)), f"nibble {i}, z={z}: {got[:4]} vs {want[:4]}"


def test_ptx_declares_its_operands() -> None:
    # 8 outputs ("=h": 16-bit) then word and zneg ("r"); the block uses exactly $0..$9.
    assert ga.OUT_CONSTRAINTS.split(",") == ["=h"] * 8 + ["r", "r"]
    for kind in ("bf16", "fp16"):
        used = set(re.findall(r"\$(\d+)", ga.dequant_asm(kind)))
        assert used == {str(i) for i in range(10)}


# -- numerics (interpreter or GPU) ------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("m", [1, 3, 16])
def test_matches_reference(dtype: str, m: int) -> None:
    # group sizes 32 / 64 / 128 across the grid; block_k 64 shrinks to 32 at group size 32.
    group_size = (32, 64, 128)[m % 3]
    p = make_packed(40, 256, group_size, seed=m)
    gen = torch.Generator().manual_seed(m + 100)
    x = torch.randn(m, 256, generator=gen).to(DTYPES[dtype]).to(DEVICE)
    bias = torch.randn(40, generator=gen).to(DTYPES[dtype]).to(DEVICE) if m != 3 else None
    y = ga.int4_linear_packed_asm(x, p, bias, ga.AsmConfig(32, 64, split_k=2))
    check(y, x, p, bias)


@pytest.mark.parametrize("split_k", [1, 3, 0])
def test_split_k_and_column_tail(split_k: int) -> None:
    # K = 256 in 4 tiles of 64: split 3 is uneven (2 + 2 tiles: 2 splits), 1 writes the output
    # directly, 0 the automatic plan; N = 50 leaves a partial column block; fp32 bias, fp16 x.
    p = make_packed(50, 256, 64, scale_dtype=torch.float16, seed=split_k)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 256, generator=gen).half().to(DEVICE)
    bias = torch.randn(50, generator=gen).to(DEVICE)
    check(ga.int4_linear_packed_asm(x, p, bias, ga.AsmConfig(16, 64, split_k=split_k)), x, p,
          bias)  # fmt: skip


def test_desc_act_permutes_x() -> None:
    # desc_act with equal groups: repack sorts channels by group (perm set, g_idx dropped), the
    # launcher permutes x's columns, the reference puts W back in checkpoint order.
    k, n, gs = 128, 24, 32
    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(k, generator=gen)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    qweight = torch.randint(-(2**31), 2**31, (k // 8, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // gs, n, generator=gen) * 0.05).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (k // gs, n), generator=gen, dtype=torch.uint8)
    p = ig.repack_int4_for_triton(qweight, scales, zeros, gs, g_idx)
    assert p.perm is not None and p.g_idx is None
    p = ig.Int4Packed(*(t.to(DEVICE) for t in (p.qweight, p.scales, p.zeros)), p.group_size,
                      p.perm.to(DEVICE))  # fmt: skip
    x = torch.randn(2, k, generator=gen).to(torch.bfloat16).to(DEVICE)
    check(ga.int4_linear_packed_asm(x, p), x, p)


def test_strided_x_and_empty_m() -> None:
    p = make_packed(16, 128, 128, seed=4)
    x = torch.randn(128, 3).to(torch.float16).to(DEVICE).t()  # [3, 128], stride(1) == 3
    check(ga.int4_linear_packed_asm(x, p, config=ga.AsmConfig(16, 128, split_k=1)), x, p)
    assert ga.int4_linear_packed_asm(x[:0], p).shape == (0, 16)


# -- config and dispatch ----------------------------------------------------------------------
def test_tables_and_plans() -> None:
    mine = ((2, ga.AsmConfig(32, 64)), (16, ga.AsmConfig(128, 128)))
    assert ga.pick_asm_config(1, mine) is mine[0][1] and ga.pick_asm_config(3, mine) is mine[1][1]
    assert ga.pick_asm_config(99, mine) is mine[1][1]
    assert ga.tile_k(128, 128) == 128 and ga.tile_k(128, 96) == 32 and ga.tile_k(128, 8) == 8
    # auto: 14336 / 64 = 224 column blocks on 132 SMs -> 2 splits of 16 tiles of 128
    assert ga.split_plan(ga.AsmConfig(64, 128), 14336, 4096, 128, 132) == (2, 16)
    splits, tiles = ga.split_plan(ga.AsmConfig(64, 128, split_k=3), 4096, 14336, 128, 132)
    assert (splits, tiles) == (3, 38)  # 112 tiles of 128: 38 + 38 + 36


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="block_n: 48 must be a power of two >= 16"):
        ga.AsmConfig(48, 128)
    with pytest.raises(ValueError, match="block_k: 8 must be a power of two >= 16"):
        ga.AsmConfig(64, 8)
    with pytest.raises(ValueError, match="split_k: -1"):
        ga.AsmConfig(64, 128, split_k=-1)
    with pytest.raises(ValueError, match="num_stages: 0"):
        ga.AsmConfig(64, 128, num_stages=0)


def _non_uniform_packed() -> ig.Int4Packed:
    # groups of 40 and 24 channels: repack keeps a g_idx (scales vary per k)
    g_idx = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)
    qweight = torch.zeros(8, 16, dtype=torch.int32)
    return ig.repack_int4_for_triton(qweight, torch.ones(2, 16), torch.zeros(2, 16,
                                     dtype=torch.uint8), 32, g_idx)  # fmt: skip


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: (torch.randn(17, 128).half(), p), "M=17 > 16"),
        (lambda p: (torch.randn(2, 128), p), "x dtype torch.float32 is not bfloat16 or float16"),
        (lambda p: (torch.randn(2, 64).half(), p), "x's K=64 differs from the packed weight's"),
        (lambda p: (torch.randn(2, 128).half(), (p.qweight,)), "not an Int4Packed"),
        (lambda p: (torch.randn(128).half(), p), "not a 2-D [M, K] tensor"),
        (lambda p: (torch.randn(2, 64).half(), _non_uniform_packed()), "has a g_idx"),
        (lambda p: (torch.randn(2, 64).half(), make_packed(16, 64, 8, device="cpu")),
         "group_size=8 is not a multiple of 16"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_reason(make, reason: str) -> None:
    x, p = make(make_packed(16, 128, 64, device="cpu"))
    if isinstance(p, ig.Int4Packed):
        assert any(reason in r for r in ga.asm_reasons(x, p)), ga.asm_reasons(x, p)
    with pytest.raises(ValueError, match=re.escape(reason)):
        ga.int4_linear_packed_asm(x, p)


def test_good_input_has_no_reasons_and_bad_bias_raises() -> None:
    p = make_packed(16, 128, 64)
    x = torch.randn(4, 128).to(torch.bfloat16).to(DEVICE)
    assert ga.asm_reasons(x, p) == []
    with pytest.raises(ValueError, match=r"bias: shape \(15,\), expected \[N=16\]"):
        ga.int4_linear_packed_asm(x, p, torch.zeros(15, device=DEVICE))


@pytest.mark.skipif(not INTERPRET, reason="checks the interpreter's refusal of inline asm")
def test_use_asm_refused_under_the_interpreter() -> None:
    p = make_packed(16, 128, 64)
    with pytest.raises(ValueError, match="use_asm: True"):
        ga.int4_linear_packed_asm(torch.randn(1, 128).half(), p, use_asm=True)


# -- the real asm path (NVIDIA GPU) -----------------------------------------------------------
def _asm_gpu() -> str | None:
    if INTERPRET or not torch.cuda.is_available():
        return "needs a CUDA GPU without TRITON_INTERPRET=1"
    if torch.version.cuda is None:
        return "inline PTX needs an NVIDIA GPU"
    if torch.cuda.get_device_capability() < ga.MIN_CC:
        return f"needs compute capability >= {ga.MIN_CC}"
    return None


gpu = pytest.mark.skipif(_asm_gpu() is not None, reason=str(_asm_gpu()))
CONFIGS = [ga.AsmConfig(64, 128, 0, 4, 4), ga.AsmConfig(128, 64, 1, 8, 3),
           ga.AsmConfig(32, 128, 4, 4, 2)]  # fmt: skip


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("k", [4096, 14336])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["auto", "wide-final", "split4"])
def test_gpu_one_hot_rows_are_exact(dtype: str, k: int, cfg: ga.AsmConfig) -> None:
    # x rows one-hot at k = 0..7 (each nibble of word 0), the last k, and random k: y[m, n] is
    # then W[n, k_m] = (q - z) * s in fp32 rounded once, bit for bit: any wrong nibble order,
    # magic constant or zero handling shows up as a mismatch.
    n = 200  # not a multiple of any block_n: a partial column block
    p = make_packed(n, k, 128, seed=k)
    gen = torch.Generator().manual_seed(5)
    ks = list(range(8)) + [k - 1] + torch.randint(0, k, (7,), generator=gen).tolist()
    x = torch.zeros(16, k)
    x[torch.arange(16), ks] = 1.0
    x = x.to(DTYPES[dtype]).cuda()
    y = ga.int4_linear_packed_asm(x, p, config=cfg, use_asm=True)
    want = ig.dequantize_packed(p)[:, ks].t().to(DTYPES[dtype])  # [16, N]
    bad = (y != want).nonzero()
    assert bad.numel() == 0, (
        f"{bad.shape[0]} mismatches, first at (m, n) = {bad[0].tolist()}: "
        f"{float(y[tuple(bad[0])])} vs {float(want[tuple(bad[0])])}"
    )


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("k", "m"), [(4096, 1), (4096, 16), (14336, 5), (14336, 16)])
def test_gpu_random_matches_reference_and_plain_path(dtype: str, k: int, m: int) -> None:
    n = 256
    p = make_packed(n, k, 128, seed=m)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(DTYPES[dtype]).cuda()
    bias = torch.randn(n, generator=gen).to(DTYPES[dtype]).cuda()
    y = ga.int4_linear_packed_asm(x, p, bias, use_asm=True)
    check(y, x, p, bias)
    # The plain-Triton dequantization computes the same exact operands: the same result.
    plain = ga.int4_linear_packed_asm(x, p, bias, use_asm=False)
    assert torch.equal(y, plain), f"asm vs plain: {float((y.float() - plain.float()).abs().max())}"
    # Deterministic: fixed split order, no atomics.
    assert torch.equal(y, ga.int4_linear_packed_asm(x, p, bias, use_asm=True))
