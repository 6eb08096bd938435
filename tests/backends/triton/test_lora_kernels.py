"""Multi-LoRA deltas (`Backend.lora_add`, the "lora" op family): the Triton shrink / expand
kernels, the CUDA backend's torch path and the CPU reference against the float64 formula, under
TRITON_INTERPRET=1 without a GPU.

Bound: y is rounded once to its dtype (half an ulp of the result, u |ref|); the fp32 sums of
A x (K terms) and B h (R terms) add at most (K + R) * 2^-24 times the sum of the terms'
magnitudes; the GEMM path may round h and h B^T to the model's dtype too (2 u times B's sum
over |h|).
Tokens without an adapter (slot -1) keep y's bits exactly.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

pytest.importorskip("triton")

from backends.cpu import linear as reference_linear  # noqa: E402
from hal.backend import LoRABatch  # noqa: E402
from tests.backends.triton.test_int4_gemm import _cuda_backend  # noqa: E402

if "backends.triton.lora" in sys.modules and INTERPRET:
    importlib.reload(sys.modules["backends.triton.lora"])
lora = importlib.import_module("backends.triton.lora")

F64 = torch.float64
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}

# name: (tokens, K, part sizes, slots S, rank R)
CASES = {
    "qkv_one_token": (1, 320, (96, 32, 32), 4, 16),
    "gate_up_k_tail": (5, 1100, (70, 70), 3, 8),
    "down_long_k": (3, 2600, (40,), 2, 16),
    "rank_32_full_step": (16, 192, (48, 16, 16), 2, 32),
    "rank_4_padded": (7, 256, (130,), 4, 4),
    "rank_64_fewer_rows": (4, 200, (300, 40), 2, 64),
}


def make(name: str, dtype: torch.dtype, seed: int):
    t, k, sizes, s, r = CASES[name]
    g = torch.Generator().manual_seed(seed)
    bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
    parts = tuple(zip(bounds[:-1], bounds[1:], strict=True))
    n, p = bounds[-1], len(parts)
    x = torch.randn(t, k, generator=g).to(dtype)
    y = torch.randn(t, n, generator=g).to(dtype)
    a = (torch.randn(p * s * r, k, generator=g) / k**0.5).to(dtype)
    b = torch.zeros(n, p * s * r, dtype=dtype)
    for i, (lo, hi) in enumerate(parts):
        b[lo:hi, i * s * r : (i + 1) * s * r] = torch.randn(hi - lo, s * r, generator=g).to(dtype)
    slots = torch.randint(-1, s, (t,), generator=g, dtype=torch.int32)
    slots[0] = s - 1  # at least one token with an adapter, the last slot
    return x, y, a, b, slots, s, r, parts


def reference(x, y, a, b, slots, s, r):
    """float64: (the exact delta, the terms' magnitudes, B's sum over |h|)."""
    col_slot = torch.arange(a.shape[0]) // r % s
    keep = (slots.long()[:, None] == col_slot[None, :]).to(F64)
    h = (x.to(F64) @ a.to(F64).t()) * keep
    h_mag = (x.to(F64).abs() @ a.to(F64).abs().t()) * keep
    bt = b.to(F64).t()
    return y.to(F64) + h @ bt, h_mag @ bt.abs(), h.abs() @ bt.abs()


def check(got, case, dtype, gemm_path: bool) -> None:
    x, y, a, b, slots, s, r, _ = case
    ref, mag, hb = reference(x, y, a, b, slots, s, r)
    got = got.cpu()
    assert got.dtype == dtype and got.shape == y.shape
    for i in range(x.shape[0]):
        if slots[i] < 0:
            assert torch.equal(got[i], y[i]), f"token {i} has no adapter, its row changed"
    k, u = x.shape[1], UNIT[dtype]
    allowed = u * ref.abs() + (k + r) * 2.0**-24 * mag + (2 * u * hb if gemm_path else 0) + 1e-30
    err = (got.to(F64) - ref).abs()
    assert (err <= allowed).all(), f"max error {(err / allowed).max().item():.2f}x the bound"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_the_reference(name: str, dtype: torch.dtype) -> None:
    case = make(name, dtype, seed=len(name))
    x, y, a, b, slots, s, r, parts = case
    args = [t.to(DEVICE) for t in (x, y.clone(), a, b, slots)]
    assert lora.unsupported(*args, s, r, parts) is None
    out = lora.lora_add(*args, s, r, parts)
    assert out.data_ptr() == args[1].data_ptr(), "y is updated in place"
    check(out, case, dtype, gemm_path=False)


def test_reference_op_is_the_formula() -> None:
    # The CPU reference (`Backend.lora_add`'s contract) against the float64 formula.
    for name in CASES:
        case = make(name, torch.float32, seed=3)
        x, y, a, b, slots, s, r, parts = case
        out = reference_linear.lora_add(x, y.clone(), a, b, slots, s, r)
        check(out, case, torch.float32, gemm_path=False)


def test_unsupported_says_why() -> None:
    x, y, a, b, slots, s, r, parts = make("qkv_one_token", torch.bfloat16, seed=1)
    assert "at most 16" in lora.unsupported(x.repeat(17, 1), y.repeat(17, 1), a, b,
                                            slots.repeat(17), s, r, parts)  # fmt: skip
    assert "do not tile" in lora.unsupported(x, y, a, b, slots, s, r, ((0, 96), (100, 160)))
    assert "at most 3" in lora.unsupported(x, y, a, b, slots, s, r, ((0, 40),) * 4)
    assert "int32" in lora.unsupported(x, y, a, b, slots.long(), s, r, parts)
    assert "not bfloat16 or float16" in lora.unsupported(x.float(), y, a, b, slots, s, r, parts)
    assert "do not match" in lora.unsupported(x, y, a[:-1], b, slots, s, r, parts)


@pytest.mark.parametrize("tokens", [1, 16, 40])
def test_cuda_backend_paths(tokens: int) -> None:
    # <= 16 tokens: the kernels; more: the GEMM path over every slot with the mask (made once a
    # step: the batch's cache), both within the bound; no token with an adapter: y unchanged.
    backend = _cuda_backend()
    case = make("qkv_one_token", torch.bfloat16, seed=tokens)
    x, y, a, b, slots, s, r, parts = case
    x, y = x.repeat(tokens, 1), y.repeat(tokens, 1)
    slots = torch.arange(tokens, dtype=torch.int32) % (s + 1) - 1
    case = (x, y, a, b, slots, s, r, parts)
    batch = LoRABatch(slots.to(DEVICE), s, r)
    out = backend.lora_add(*[t.to(DEVICE) for t in (x, y.clone(), a, b)], batch, parts)
    check(out, case, torch.bfloat16, gemm_path=tokens > lora.MAX_TOKENS)
    assert backend.ran["lora"] == ("torch" if tokens > lora.MAX_TOKENS else "triton")
    assert bool(batch.cache) == (tokens > lora.MAX_TOKENS)
    none = LoRABatch(torch.full((tokens,), -1, dtype=torch.int32, device=DEVICE), s, r)
    same = backend.lora_add(*[t.to(DEVICE) for t in (x, y.clone(), a, b)], none, parts)
    assert torch.equal(same.cpu(), y)
