"""Multi-LoRA deltas (`Backend.lora_add`, the "lora" op family): the Triton shrink / expand
kernels (per token up to 16 tokens, sorted blocks above), the CUDA backend's torch path and the
CPU reference against the float64 formula, under TRITON_INTERPRET=1 without a GPU.

Bound: y is rounded once to its dtype (half an ulp of the result, u |ref|); the fp32 sums of
A x (K terms) and B h (R terms) add at most (K + R) * 2^-24 times the sum of the terms'
magnitudes; each rounding of h (or of h B^T) to the model's dtype adds u times B's sum over
|h|: the block kernels round h once, the GEMM path may round h and h B^T.
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

# The kernels are defined when their module runs: reload any imported without the interpreter,
# the block kernels first (the entry module calls them).
for _name in ("lora_wide", "lora"):
    if f"backends.triton.{_name}" in sys.modules and INTERPRET:
        importlib.reload(sys.modules[f"backends.triton.{_name}"])
lora = importlib.import_module("backends.triton.lora")
lora_wide = importlib.import_module("backends.triton.lora_wide")

F64 = torch.float64
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}

# name: (tokens, K, part sizes, slots S, rank R[, the slots tokens draw from])
CASES = {
    "qkv_one_token": (1, 320, (96, 32, 32), 4, 16),
    "gate_up_k_tail": (5, 1100, (70, 70), 3, 8),
    "down_long_k": (3, 2600, (40,), 2, 16),
    "rank_32_full_step": (16, 192, (48, 16, 16), 2, 32),
    "rank_4_padded": (7, 256, (130,), 4, 4),
    "rank_64_fewer_rows": (4, 200, (300, 40), 2, 64),
    # More than 16 tokens: the sorted block kernels. Blocks of 16 / 32 sorted tokens span
    # several slots; a last block of one token (17); K split with a tail (1100, 2600).
    "wide_qkv_17": (17, 320, (96, 32, 32), 4, 16),
    "wide_gate_up_40": (40, 1100, (70, 70), 3, 8),
    "wide_down_rank_1": (130, 2600, (40,), 2, 1),
    "wide_rank_8_one_slot": (33, 256, (48, 16, 16), 1, 8),
    # Slots 1-4 unused inside a block's range [0, 5]; 28 tokens of slot -1 fill the first block
    # and part of the second.
    "wide_slot_gaps": (70, 192, (64, 40), 6, 16, (-1, -1, -1, 0, 5)),
    "wide_rank_64": (50, 200, (300, 40), 2, 64),
}


def make(name: str, dtype: torch.dtype, seed: int):
    t, k, sizes, s, r, *drawn = CASES[name]
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
    if drawn:
        pick = torch.randint(0, len(drawn[0]), (t,), generator=g)
        slots = torch.tensor(drawn[0], dtype=torch.int32)[pick]
    else:
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


def h_roundings(tokens: int) -> int:
    """How often the Triton kernels round h to the dtype: the block kernels once."""
    return 0 if tokens <= lora.MAX_TOKENS else 1


def check(got, case, dtype, h_rounded: int) -> None:
    x, y, a, b, slots, s, r, _ = case
    ref, mag, hb = reference(x, y, a, b, slots, s, r)
    got = got.cpu()
    assert got.dtype == dtype and got.shape == y.shape
    for i in range(x.shape[0]):
        if slots[i] < 0:
            assert torch.equal(got[i], y[i]), f"token {i} has no adapter, its row changed"
    k, u = x.shape[1], UNIT[dtype]
    allowed = u * ref.abs() + (k + r) * 2.0**-24 * mag + h_rounded * u * hb + 1e-30
    err = (got.to(F64) - ref).abs()
    assert (err <= allowed).all(), f"max error {(err / allowed).max().item():.2f}x the bound"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_the_reference(name: str, dtype: torch.dtype) -> None:
    # x and y as column slices of wider buffers (row strides past their widths); the columns
    # beyond y keep their bits.
    case = make(name, dtype, seed=len(name))
    x, y, a, b, slots, s, r, parts = case
    x_buf = torch.cat([x, torch.randn(x.shape[0], 5).to(dtype)], 1).to(DEVICE)
    y_buf = torch.cat([y, torch.randn(y.shape[0], 3).to(dtype)], 1).to(DEVICE)
    pad = y_buf[:, y.shape[1] :].clone()
    args = [x_buf[:, : x.shape[1]], y_buf[:, : y.shape[1]], *(t.to(DEVICE) for t in (a, b, slots))]
    assert lora.unsupported(*args, s, r, parts) is None
    cache = {}
    out = lora.lora_add(*args, s, r, parts, cache=cache)
    assert out.data_ptr() == y_buf.data_ptr(), "y is updated in place"
    assert bool(cache) == (x.shape[0] > lora.MAX_TOKENS), "the block kernels keep the sort"
    assert torch.equal(y_buf[:, y.shape[1] :], pad)
    check(out, case, dtype, h_roundings(x.shape[0]))


def test_reference_op_is_the_formula() -> None:
    # The CPU reference (`Backend.lora_add`'s contract) against the float64 formula.
    for name in CASES:
        case = make(name, torch.float32, seed=3)
        x, y, a, b, slots, s, r, parts = case
        out = reference_linear.lora_add(x, y.clone(), a, b, slots, s, r)
        check(out, case, torch.float32, h_rounded=0)


def test_unsupported_says_why() -> None:
    x, y, a, b, slots, s, r, parts = make("qkv_one_token", torch.bfloat16, seed=1)
    assert lora.unsupported(x.repeat(900, 1), y.repeat(900, 1), a, b, slots.repeat(900), s, r,
                            parts) is None  # fmt: skip
    assert "do not tile" in lora.unsupported(x, y, a, b, slots, s, r, ((0, 96), (100, 160)))
    assert "at most 3" in lora.unsupported(x, y, a, b, slots, s, r, ((0, 40),) * 4)
    assert "int32" in lora.unsupported(x, y, a, b, slots.long(), s, r, parts)
    assert "not bfloat16 or float16" in lora.unsupported(x.float(), y, a, b, slots, s, r, parts)
    assert "x's dtype" in lora.unsupported(x, y, a.half(), b, slots, s, r, parts)
    assert "do not match" in lora.unsupported(x, y, a[:-1], b, slots, s, r, parts)


@pytest.mark.parametrize("tokens", [1, 16, 17, 130])
def test_cuda_backend_paths(tokens: int) -> None:
    # bf16 steps of any size: the Triton kernels (<= 16 tokens per token, more in sorted blocks
    # with the sort made once a step: the batch's cache), within the bound; fp32: the GEMM path
    # over every slot with the mask (also in the cache); no token with an adapter: y unchanged.
    backend = _cuda_backend()
    case = make("qkv_one_token", torch.bfloat16, seed=tokens)
    x, y, a, b, slots, s, r, parts = case
    x, y = x.repeat(tokens, 1), y.repeat(tokens, 1)
    slots = torch.arange(tokens, dtype=torch.int32) % (s + 1) - 1
    case = (x, y, a, b, slots, s, r, parts)
    batch = LoRABatch(slots.to(DEVICE), s, r)
    out = backend.lora_add(*[t.to(DEVICE) for t in (x, y.clone(), a, b)], batch, parts)
    check(out, case, torch.bfloat16, h_roundings(tokens))
    assert backend.ran["lora"] == "triton"
    assert list(batch.cache) == (["sorted"] if tokens > lora.MAX_TOKENS else [])
    none = LoRABatch(torch.full((tokens,), -1, dtype=torch.int32, device=DEVICE), s, r)
    same = backend.lora_add(*[t.to(DEVICE) for t in (x, y.clone(), a, b)], none, parts)
    assert torch.equal(same.cpu(), y)
    f32 = (x.float(), y.float(), a.float(), b.float())
    batch = LoRABatch(slots.to(DEVICE), s, r)
    out = backend.lora_add(*[t.to(DEVICE) for t in (f32[0], f32[1].clone(), *f32[2:])], batch,
                           parts)  # fmt: skip
    check(out, (*f32, slots, s, r, parts), torch.float32, h_rounded=2)
    assert backend.ran["lora"] == "torch"


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("tokens", [40, 5000])
def test_block_kernels_in_a_cuda_graph(tokens: int) -> None:
    # The sort (torch.sort: in-place small sort up to 4096 keys, CUB radix sort above) and both
    # block kernels captured once and replayed on new slots and x: the same bits as eager calls
    # (nothing of the step read on the host).
    backend = _cuda_backend()
    x, y, a, b, slots, s, r, parts = make("wide_gate_up_40", torch.bfloat16, seed=5)
    reps = -(-tokens // x.shape[0])
    x, y, slots = (t.repeat(reps, *[1] * (t.dim() - 1))[:tokens] for t in (x, y, slots))
    x, y, a, b, slots = (t.cuda() for t in (x, y, a, b, slots))
    static_x, static_y, static_slots = x.clone(), y.clone(), slots.clone()

    def step() -> torch.Tensor:
        batch = LoRABatch(static_slots, s, r)
        return backend.lora_add(static_x, static_y, a, b, batch, parts)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up (compiles)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        new_slots = torch.randint(-1, s, slots.shape, generator=g, device="cuda")
        new_x = torch.randn(x.shape, generator=g, device="cuda").to(x.dtype)
        static_slots.copy_(new_slots.int())
        static_x.copy_(new_x)
        static_y.copy_(y)
        graph.replay()
        want = backend.lora_add(new_x, y.clone(), a, b, LoRABatch(new_slots.int(), s, r), parts)
        assert torch.equal(static_y, want)
