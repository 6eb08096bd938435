"""Hypothesis strategies for op conformance: each draws a small frozen case (shapes, flags, a seed)
whose `build()` makes the tensors, so a failing case prints compactly and rebuilds exactly.

Structure (lengths, block order, flags) is drawn by Hypothesis and shrinks; values come from a
seeded torch generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st

from hal.capabilities import TORCH_DTYPES

FLOAT_DTYPES = ("fp32", "bf16", "fp16")
FP8_DTYPES = ("fp8_e4m3fn", "fp8_e4m3fnuz")
HEAD_DIMS = (64, 80, 96, 128, 256)
BLOCK_SIZES = (8, 16, 32)
GQA_RATIOS = (1, 2, 4, 8)
INT4_GROUP_SIZES = (32, 64, 128)
# A finite "garbage" value written to every cache slot no sequence owns: a kernel that reads
# past seq_len or outside its block table gets scores far from the real ones.
POISON = 50.0


@dataclass(frozen=True)
class Limits:
    """Size caps; "ci" keeps the float64 reference fast on 2 cores, "thorough" goes bigger."""

    max_seqs: int = 8
    max_context: int = 320
    max_query_tokens: int = 96  # new tokens in one batch, all sequences together
    max_kv_heads: int = 2
    max_m: int = 48
    max_k: int = 320
    max_n: int = 160
    max_tokens: int = 32  # rows of the small fused ops
    max_hidden: int = 512
    max_int4_groups: int = 4
    max_gguf_superblocks: int = 2  # K-quant super-blocks of 256 along K (32-value types: 8x)


LIMITS: dict[str, Limits] = {
    "ci": Limits(),
    "thorough": Limits(
        max_context=1100,
        max_query_tokens=384,
        max_kv_heads=4,
        max_m=160,
        max_k=1100,
        max_n=400,
        max_tokens=128,
        max_hidden=2100,
        max_int4_groups=12,
        max_gguf_superblocks=5,
    ),
}


def limits_for(profile: str) -> Limits:
    if profile not in LIMITS:
        raise ValueError(f"profile: {profile!r} is not one of {', '.join(LIMITS)}")
    return LIMITS[profile]


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape: tuple[int, ...], gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """fp32 normal values on the CPU (cast by the caller)."""
    return torch.randn(shape, generator=gen, dtype=torch.float32) * scale


def encode(x: torch.Tensor, dtype: str, kv_scale: float | None = None) -> torch.Tensor:
    """fp32 values -> `dtype`; FP8 stores fp8(clamp(x / kv_scale)) like an FP8 KV cache."""
    td = torch_dtype(dtype)
    if dtype.startswith("fp8"):
        fmax = torch.finfo(td).max
        return (x / (kv_scale or 1.0)).clamp(-fmax, fmax).to(td)
    return x.to(td)


seeds = st.integers(0, 2**31 - 1)


# -- attention batches ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionBatch:
    """A paged batch: per sequence a total KV length and a query length (1 = decode, = seq_len
    prefill, in between chunked prefill); blocks handed out in `block_order`."""

    dtype: str  # query (and new K/V) dtype
    cache_dtype: str  # the cache's dtype: `dtype` or an FP8 format
    num_kv_heads: int
    gqa_ratio: int
    head_dim: int
    block_size: int
    seq_lens: tuple[int, ...]
    query_lens: tuple[int, ...]
    num_blocks: int
    block_order: tuple[int, ...]  # a permutation of range(num_blocks)
    sliding_window: int | None
    soft_cap: float | None
    kv_scale: float | None  # FP8 caches only
    score_scale: float  # multiplies the queries: 1 is soft, 4 is a peaked softmax
    num_padding: int  # extra slot -1 tokens for write_kv
    seed: int

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.gqa_ratio

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def blocks_needed(self) -> list[int]:
        return [-(-n // self.block_size) for n in self.seq_lens]

    def block_tables(self) -> torch.Tensor:
        """int32 [num_seqs, max_blocks]: sequence s owns the next blocks of `block_order`."""
        need = self.blocks_needed()
        table = torch.zeros(len(need), max(need), dtype=torch.int32)
        start = 0
        for s, n in enumerate(need):
            table[s, :n] = torch.tensor(self.block_order[start : start + n], dtype=torch.int32)
            start += n
        return table

    def token_slots(self) -> torch.Tensor:
        """int64 [num_tokens]: the cache slot of every new (query) token, packed per sequence."""
        table = self.block_tables()
        slots = []
        for s, (n, q) in enumerate(zip(self.seq_lens, self.query_lens, strict=True)):
            pos = torch.arange(n - q, n)
            blocks = table[s, pos // self.block_size].long()
            slots.append(blocks * self.block_size + pos % self.block_size)
        return torch.cat(slots)

    def build(self) -> dict[str, torch.Tensor | float | int | None]:
        """CPU tensors: query [T, H, D], key/value caches [B, bs, Hkv, D] with every owned slot
        filled and every other slot POISON, block_tables, seq_lens, query_start_loc, and the new
        tokens' key/value [T, Hkv, D] with their slot_mapping (as write_kv would get them)."""
        gen = generator(self.seed)
        d, hkv = self.head_dim, self.num_kv_heads
        shape = (self.num_blocks, self.block_size, hkv, d)
        owned = torch.zeros(self.num_blocks * self.block_size, dtype=torch.bool)
        table = self.block_tables()
        for s, n in enumerate(self.seq_lens):
            pos = torch.arange(n)
            blocks = table[s, pos // self.block_size].long()
            owned[blocks * self.block_size + pos % self.block_size] = True
        caches = []
        for _ in range(2):
            vals = randn(shape, gen).reshape(-1, hkv, d)
            vals[~owned] = POISON
            caches.append(encode(vals.reshape(shape), self.cache_dtype, self.kv_scale))
        num_tokens = self.num_tokens
        query = (randn((num_tokens, self.num_heads, d), gen) * self.score_scale).to(
            torch_dtype(self.dtype)
        )
        starts = [0]
        for q in self.query_lens:
            starts.append(starts[-1] + q)
        return {
            "query": query,
            "key_cache": caches[0],
            "value_cache": caches[1],
            "block_tables": table,
            "seq_lens": torch.tensor(self.seq_lens, dtype=torch.int32),
            "query_start_loc": torch.tensor(starts, dtype=torch.int32),
            "scale": 1.0 / math.sqrt(d),
            "key": randn((num_tokens, hkv, d), gen).to(torch_dtype(self.dtype)),
            "value": randn((num_tokens, hkv, d), gen).to(torch_dtype(self.dtype)),
            "slot_mapping": self.token_slots(),
        }


@st.composite
def attention_batches(
    draw,
    dtype: str,
    cache_dtype: str | None = None,
    limits: Limits = LIMITS["ci"],
    head_dims: tuple[int, ...] = HEAD_DIMS,
) -> AttentionBatch:
    """1-8 sequences mixing decode, prefill and chunked prefill over a shuffled block pool."""
    cache_dtype = cache_dtype or dtype
    num_seqs = draw(st.integers(1, limits.max_seqs))
    budget = limits.max_query_tokens
    seq_lens, query_lens = [], []
    for s in range(num_seqs):
        left = budget - (num_seqs - s - 1)  # leave at least one token for each later sequence
        kind = draw(st.sampled_from(("decode", "prefill", "chunk")))
        if kind == "decode" or left <= 1:
            seq_len = draw(st.integers(1, limits.max_context))
            q = 1
        elif kind == "prefill":
            seq_len = draw(st.integers(1, min(left, limits.max_context)))
            q = seq_len
        else:
            seq_len = draw(st.integers(2, limits.max_context))
            q = draw(st.integers(1, min(left, seq_len - 1)))
        budget -= q
        seq_lens.append(seq_len)
        query_lens.append(q)
    block_size = draw(st.sampled_from(BLOCK_SIZES))
    needed = sum(-(-n // block_size) for n in seq_lens)
    num_blocks = needed + draw(st.integers(0, 3))  # spare blocks hold POISON
    block_order = tuple(draw(st.permutations(range(num_blocks))))
    is_fp8 = cache_dtype.startswith("fp8")
    return AttentionBatch(
        dtype=dtype,
        cache_dtype=cache_dtype,
        num_kv_heads=draw(st.integers(1, limits.max_kv_heads)),
        gqa_ratio=draw(st.sampled_from(GQA_RATIOS)),
        head_dim=draw(st.sampled_from(head_dims)),
        block_size=block_size,
        seq_lens=tuple(seq_lens),
        query_lens=tuple(query_lens),
        num_blocks=num_blocks,
        block_order=block_order,
        sliding_window=draw(st.none() | st.integers(1, limits.max_context)),
        soft_cap=draw(st.none() | st.sampled_from((5.0, 30.0, 50.0))),
        kv_scale=draw(st.sampled_from((0.05, 0.5, 1.0, 2.0))) if is_fp8 else None,
        score_scale=draw(st.sampled_from((1.0, 4.0))),
        num_padding=draw(st.integers(0, 4)),
        seed=draw(seeds),
    )


# -- copy_blocks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CopyBlocksCase:
    dtype: str
    num_layers: int  # K and V per layer: 2 * num_layers cache tensors
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    src: tuple[int, ...]
    dst: tuple[int, ...]  # distinct, disjoint from src (copy-on-write targets are fresh blocks)
    seed: int

    def build(self) -> dict[str, object]:
        gen = generator(self.seed)
        shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        caches = [encode(randn(shape, gen), self.dtype) for _ in range(2 * self.num_layers)]
        return {
            "caches": caches,
            "src": torch.tensor(self.src, dtype=torch.int64),
            "dst": torch.tensor(self.dst, dtype=torch.int64),
        }


@st.composite
def copy_blocks_cases(draw, dtype: str) -> CopyBlocksCase:
    num_blocks = draw(st.integers(2, 24))
    order = draw(st.permutations(range(num_blocks)))
    num_dst = draw(st.integers(1, num_blocks // 2))
    dst = tuple(order[:num_dst])
    pool = order[num_dst:]
    src = tuple(draw(st.lists(st.sampled_from(pool), min_size=num_dst, max_size=num_dst)))
    return CopyBlocksCase(
        dtype=dtype,
        num_layers=draw(st.integers(1, 3)),
        num_blocks=num_blocks,
        block_size=draw(st.sampled_from(BLOCK_SIZES)),
        num_kv_heads=draw(st.integers(1, 4)),
        head_dim=draw(st.sampled_from((8, 64, 80))),
        src=src,
        dst=dst,
        seed=draw(seeds),
    )


# -- GEMMs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmShape:
    m: int
    k: int
    n: int
    batch: int | None  # a leading batch dim on x ([batch, M, K]) for the dense GEMM
    has_bias: bool


@st.composite
def gemm_shapes(draw, limits: Limits = LIMITS["ci"], k_multiple: int = 1) -> GemmShape:
    """M, K, N from 1 up, odd sizes included (Hypothesis favours the edges: 1, max, primes)."""
    k = draw(st.integers(1, max(1, limits.max_k // k_multiple))) * k_multiple
    return GemmShape(
        m=draw(st.integers(1, limits.max_m)),
        k=k,
        n=draw(st.integers(1, limits.max_n)),
        batch=draw(st.none() | st.integers(1, 3)),
        has_bias=draw(st.booleans()),
    )


@dataclass(frozen=True)
class LinearCase:
    dtype: str
    shape: GemmShape
    seed: int

    def build(self) -> dict[str, torch.Tensor | None]:
        s, gen, td = self.shape, generator(self.seed), torch_dtype(self.dtype)
        lead = (s.batch, s.m) if s.batch else (s.m,)
        return {
            "x": randn((*lead, s.k), gen).to(td),
            "weight": randn((s.n, s.k), gen, 1.0 / math.sqrt(s.k)).to(td),
            "bias": randn((s.n,), gen).to(td) if s.has_bias else None,
        }


@st.composite
def linear_cases(draw, dtype: str, limits: Limits = LIMITS["ci"]) -> LinearCase:
    return LinearCase(dtype, draw(gemm_shapes(limits)), draw(seeds))


@dataclass(frozen=True)
class ScaledGemmCase:
    """FP8 or INT8 operands with per-tensor or per-token/per-channel fp32 scales."""

    qdtype: str  # fp8 format or "int8"
    per_token: bool  # x_scale [M, 1] and w_scale [N, 1], else [1] and [1]
    out_dtype: str
    shape: GemmShape
    seed: int
    block: int = 0  # > 0: block-scaled, x_scale [M, K / block] and w_scale [N / rows, K / block]
    rows: int = 1  # block-scaled: consecutive weight rows sharing one scale (dividing N)

    def build(self) -> dict[str, torch.Tensor | None]:
        s, gen = self.shape, generator(self.seed)
        if self.qdtype == "int8":
            x_q = torch.randint(-128, 128, (s.m, s.k), generator=gen, dtype=torch.int8)
            w_q = torch.randint(-128, 128, (s.n, s.k), generator=gen, dtype=torch.int8)
        else:
            x_q = encode(randn((s.m, s.k), gen, 64.0), self.qdtype)
            w_q = encode(randn((s.n, s.k), gen, 64.0), self.qdtype)
        xs_shape = (s.m, 1) if self.per_token else (1,)
        ws_shape = (s.n, 1) if self.per_token else (1,)
        if self.block:
            xs_shape, ws_shape = (s.m, s.k // self.block), (s.n // self.rows, s.k // self.block)
        return {
            "x_q": x_q,
            "x_scale": torch.rand(xs_shape, generator=gen) * 0.02 + 0.001,
            "w_q": w_q,
            "w_scale": torch.rand(ws_shape, generator=gen) * 0.02 + 0.001,
            "bias": randn((s.n,), gen).to(torch_dtype(self.out_dtype)) if s.has_bias else None,
            "out_dtype": torch_dtype(self.out_dtype),
        }


@st.composite
def scaled_gemm_cases(
    draw, qdtype: str, per_token: bool, out_dtypes: tuple[str, ...], limits: Limits = LIMITS["ci"]
) -> ScaledGemmCase:
    return ScaledGemmCase(
        qdtype=qdtype,
        per_token=per_token,
        out_dtype=draw(st.sampled_from(out_dtypes)),
        shape=draw(gemm_shapes(limits)),
        seed=draw(seeds),
    )


@st.composite
def fp8_block_cases(
    draw, qdtype: str, out_dtypes: tuple[str, ...], limits: Limits = LIMITS["ci"]
) -> ScaledGemmCase:
    """Block-scaled FP8 GEMMs: blocks of 16-128 columns (powers of two, the kernels' tiles),
    2-4 blocks (one block is the per-token case), M and N as for any GEMM (odd sizes included),
    weight scales per row or shared by R consecutive rows (R dividing N)."""
    fits = tuple(b for b in (16, 32, 64, 128) if 2 * b <= max(limits.max_k, 32))
    block = draw(st.sampled_from(fits))
    shape = draw(gemm_shapes(limits))
    k = draw(st.integers(2, max(2, min(4, limits.max_k // block)))) * block
    rows = draw(st.sampled_from([r for r in (1, 2, 4, 16, shape.n) if shape.n % r == 0]))
    return ScaledGemmCase(
        qdtype=qdtype,
        per_token=True,
        out_dtype=draw(st.sampled_from(out_dtypes)),
        shape=GemmShape(shape.m, k, shape.n, None, shape.has_bias),
        seed=draw(seeds),
        block=block,
        rows=rows,
    )


def pack_int4_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [K, N] -> int32 [K / 8, N], nibble i of word r = row 8r + i (GPTQ order).

    Written independently of the reference's packer so the two check each other."""
    k, n = codes.shape
    words = torch.zeros(k // 8, n, dtype=torch.int64)
    for i in range(8):
        words += codes[i::8].to(torch.int64) << (4 * i)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


@dataclass(frozen=True)
class Int4Case:
    """Canonical 4-bit layout with random codes, group scales and zeros; optional act-order."""

    dtype: str  # activations and scales
    m: int
    n: int
    group_size: int
    num_groups: int
    act_order: bool  # g_idx from a random permutation of the input channels
    has_bias: bool
    seed: int

    @property
    def k(self) -> int:
        return self.group_size * self.num_groups

    def build(self) -> dict[str, torch.Tensor | int | None]:
        gen, td = generator(self.seed), torch_dtype(self.dtype)
        codes = torch.randint(0, 16, (self.k, self.n), generator=gen, dtype=torch.uint8)
        g_idx = None
        if self.act_order:
            perm = torch.randperm(self.k, generator=gen)
            g_idx = torch.empty(self.k, dtype=torch.int32)
            g_idx[perm] = (torch.arange(self.k) // self.group_size).to(torch.int32)
        return {
            "x": randn((self.m, self.k), gen).to(td),
            "codes": codes,
            "qweight": pack_int4_codes(codes),
            "scales": (torch.rand((self.num_groups, self.n), generator=gen) * 0.02 + 0.002).to(td),
            "zeros": torch.randint(0, 16, (self.num_groups, self.n), generator=gen).to(torch.uint8),
            "group_size": self.group_size,
            "g_idx": g_idx,
            "bias": randn((self.n,), gen).to(td) if self.has_bias else None,
        }


@st.composite
def int4_cases(
    draw,
    dtypes: tuple[str, ...],
    act_order: bool,
    limits: Limits = LIMITS["ci"],
    group_sizes: tuple[int, ...] = INT4_GROUP_SIZES,
    max_groups: int | None = None,
) -> Int4Case:
    return Int4Case(
        dtype=draw(st.sampled_from(dtypes)),
        m=draw(st.integers(1, limits.max_m)),
        n=draw(st.integers(1, limits.max_n)),
        group_size=draw(st.sampled_from(group_sizes)),
        num_groups=draw(st.integers(1, min(limits.max_int4_groups, max_groups or 1 << 30))),
        act_order=act_order,
        has_bias=draw(st.booleans()),
        seed=draw(seeds),
    )


# -- GGUF block weights --------------------------------------------------------------------------
GGUF_QTYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")
_GGUF_BLOCK_SIZE = {"Q4_0": 32, "Q4_1": 32, "Q8_0": 32, "Q4_K": 256, "Q6_K": 256}


@dataclass(frozen=True)
class GGUFCase:
    """x [M, K] in `dtype` and a GGUF weight [N, K] of `qtype` as random valid ggml blocks (every
    code and packed scale bit drawn, fp16 fields finite: tests/backends/gguf/gguf_random.py)."""

    dtype: str  # activations and bias
    qtype: str
    m: int
    n: int
    num_blocks: int  # ggml blocks along K
    has_bias: bool
    seed: int

    @property
    def k(self) -> int:
        return _GGUF_BLOCK_SIZE[self.qtype] * self.num_blocks

    def build(self) -> dict[str, torch.Tensor | None]:
        from tests.backends.gguf.gguf_random import random_blocks

        gen, td = generator(self.seed), torch_dtype(self.dtype)
        return {
            "x": randn((self.m, self.k), gen).to(td),
            "blocks": random_blocks(self.qtype, self.n, self.k, self.seed),
            "bias": randn((self.n,), gen).to(td) if self.has_bias else None,
        }


@st.composite
def gguf_cases(draw, dtype: str, qtype: str, limits: Limits = LIMITS["ci"]) -> GGUFCase:
    if qtype not in _GGUF_BLOCK_SIZE:
        raise ValueError(f"qtype: {qtype!r} is not one of {', '.join(_GGUF_BLOCK_SIZE)}")
    per_super = 256 // _GGUF_BLOCK_SIZE[qtype]
    return GGUFCase(
        dtype=dtype,
        qtype=qtype,
        m=draw(st.integers(1, limits.max_m)),
        n=draw(st.integers(1, limits.max_n)),
        num_blocks=draw(st.integers(1, limits.max_gguf_superblocks * per_super)),
        has_bias=draw(st.booleans()),
        seed=draw(seeds),
    )


# -- GGUF decoder stacks -------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFDecoderCase:
    """A Llama-style decoder stack of `num_layers` layers on `qtype` weights over a paged batch
    (fp32, no soft-cap or KV scale, no padding tokens): hidden = `hidden_blocks` ggml blocks,
    the MLP `inter_blocks` blocks wide; a rotary table over `rotary_fraction` of the head;
    decode batches (one new token a sequence: what a backend may fuse) drawn 3 times in 4."""

    batch: AttentionBatch
    qtype: str
    num_layers: int
    hidden_blocks: int
    inter_blocks: int
    with_residual: bool
    is_neox: bool
    rotary_fraction: float
    seed: int

    @property
    def hidden(self) -> int:
        return _GGUF_BLOCK_SIZE[self.qtype] * self.hidden_blocks

    @property
    def inter(self) -> int:
        return _GGUF_BLOCK_SIZE[self.qtype] * self.inter_blocks

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Each linear's [out, in]."""
        b, h = self.batch, self.hidden
        return {"qkv": ((b.num_heads + 2 * b.num_kv_heads) * b.head_dim, h),
                "o": (h, b.num_heads * b.head_dim), "gate_up": (2 * self.inter, h),
                "down": (h, self.inter)}  # fmt: skip

    def build(self) -> dict:
        """The batch's tensors, positions, cos_sin_cache, hidden (and residual) rows, and per
        layer its norm weights and the raw blocks of qkv, o, gate_up and down."""
        from tests.backends.gguf.gguf_random import random_blocks

        b, t = self.batch, self.batch.build()
        gen = generator(self.seed)
        d, h = b.head_dim, self.hidden
        rot = 2 * int(d * self.rotary_fraction // 2)
        max_pos = max(b.seq_lens)
        exponents = torch.arange(rot // 2, dtype=torch.float64) * 2 / rot
        freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] / 10000.0**exponents
        positions = torch.cat([torch.arange(n - q, n) for n, q in zip(b.seq_lens, b.query_lens,
                                                                      strict=True)])  # fmt: skip
        layers, seed = [], self.seed
        for _ in range(self.num_layers):
            layer = {"input_norm": 1 + 0.1 * randn((h,), gen),
                     "post_norm": 1 + 0.1 * randn((h,), gen)}  # fmt: skip
            for name, (n, k) in self.shapes().items():
                seed += 1
                layer[name] = random_blocks(self.qtype, n, k, seed)
            layers.append(layer)
        num_tokens = b.num_tokens
        return {
            **t,
            "positions": positions,
            "cos_sin_cache": torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(torch.float32),
            "hidden": randn((num_tokens, h), gen),
            "residual": randn((num_tokens, h), gen) if self.with_residual else None,
            "layers": layers,
        }


@st.composite
def gguf_decoder_cases(draw, qtype: str, limits: Limits = LIMITS["ci"]) -> GGUFDecoderCase:
    block = _GGUF_BLOCK_SIZE[qtype]
    batch = draw(attention_batches("fp32", "fp32", limits, head_dims=(64, 80, 128)))
    if draw(st.sampled_from((True, True, True, False))):  # decode: one new token a sequence
        batch = replace(batch, query_lens=(1,) * len(batch.seq_lens))
    # o's K (heads x head_dim) must be whole ggml blocks: the fewest heads that make it so.
    step = block // math.gcd(block, batch.head_dim)
    if batch.num_heads % step:
        batch = replace(batch, gqa_ratio=step if step in GQA_RATIOS else max(GQA_RATIOS))
    if batch.num_heads % step:
        batch = replace(batch, num_kv_heads=step // batch.gqa_ratio)
    batch = replace(batch, soft_cap=None, kv_scale=None, num_padding=0)
    per_super = 256 // block
    blocks = st.integers(1, limits.max_gguf_superblocks * per_super)
    return GGUFDecoderCase(
        batch=batch,
        qtype=qtype,
        num_layers=draw(st.integers(1, 2)),
        hidden_blocks=draw(blocks),
        inter_blocks=draw(blocks),
        with_residual=draw(st.booleans()),
        is_neox=True,  # the Llama family's (a backend may fuse only these)
        rotary_fraction=draw(st.sampled_from((1.0, 0.5))),
        seed=draw(seeds),
    )


# -- quantization inputs -------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantCase:
    """x [M, K] spanning magnitudes 10^exponent, optionally with all-zero rows (the eps floor)."""

    dtype: str  # x's dtype
    target: str  # fp8 format, "int8" or "int4"
    m: int
    k: int
    exponent: int
    zero_rows: bool
    per_token: bool
    static: bool  # pass a precomputed scale
    symmetric: bool  # int4 only
    group_size: int  # int4 only
    seed: int

    def build(self) -> dict[str, torch.Tensor]:
        gen = generator(self.seed)
        x = randn((self.m, self.k), gen, 10.0**self.exponent)
        if self.zero_rows:
            x[torch.rand(self.m, generator=gen) < 0.3] = 0.0
        x = x.to(torch_dtype(self.dtype))
        shape = (self.m, 1) if self.per_token else (1,)
        # A static scale that clips some values: the clamp path is part of the contract.
        scale = torch.rand(shape, generator=gen) * 10.0**self.exponent * 0.01 + 1e-6
        return {"x": x, "scale": scale}


@st.composite
def quant_cases(
    draw, target: str, dtypes: tuple[str, ...], limits: Limits = LIMITS["ci"]
) -> QuantCase:
    group_size = draw(st.sampled_from(INT4_GROUP_SIZES)) if target == "int4" else 1
    if target == "int4":
        k = group_size * draw(st.integers(1, limits.max_int4_groups))
    else:
        k = draw(st.integers(1, limits.max_k))
    return QuantCase(
        dtype=draw(st.sampled_from(dtypes)),
        target=target,
        m=draw(st.integers(1, limits.max_m)),
        k=k,
        exponent=draw(st.integers(-3, 3)),
        zero_rows=draw(st.booleans()),
        per_token=draw(st.booleans()),
        static=draw(st.booleans()) if target != "int4" else False,
        symmetric=draw(st.booleans()) if target == "int4" else False,
        group_size=group_size,
        seed=draw(seeds),
    )


@dataclass(frozen=True)
class DequantFp8Case:
    fp8_dtype: str
    out_dtype: str
    m: int
    k: int
    per_token: bool
    seed: int

    def build(self) -> dict[str, torch.Tensor]:
        gen = generator(self.seed)
        q = encode(randn((self.m, self.k), gen, 100.0), self.fp8_dtype)
        shape = (self.m, 1) if self.per_token else (1,)
        return {"q": q, "scale": torch.rand(shape, generator=gen) * 0.1 + 1e-4}


@st.composite
def dequant_fp8_cases(
    draw, fp8_dtype: str, out_dtypes: tuple[str, ...], limits: Limits = LIMITS["ci"]
) -> DequantFp8Case:
    return DequantFp8Case(
        fp8_dtype=fp8_dtype,
        out_dtype=draw(st.sampled_from(out_dtypes)),
        m=draw(st.integers(1, limits.max_m)),
        k=draw(st.integers(1, limits.max_k)),
        per_token=draw(st.booleans()),
        seed=draw(seeds),
    )


# -- fused small ops -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RmsNormCase:
    dtype: str
    num_tokens: int
    hidden: int
    eps: float
    with_residual: bool
    exponent: int
    seed: int

    def build(self) -> dict[str, torch.Tensor | float | None]:
        gen, td = generator(self.seed), torch_dtype(self.dtype)
        shape, mag = (self.num_tokens, self.hidden), 10.0**self.exponent
        return {
            "x": randn(shape, gen, mag).to(td),
            "weight": (1.0 + 0.1 * randn((self.hidden,), gen)).to(td),
            "eps": self.eps,
            "residual": randn(shape, gen, mag).to(td) if self.with_residual else None,
        }


@st.composite
def rms_norm_cases(
    draw, dtype: str, with_residual: bool, limits: Limits = LIMITS["ci"]
) -> RmsNormCase:
    return RmsNormCase(
        dtype=dtype,
        num_tokens=draw(st.integers(1, limits.max_tokens)),
        hidden=draw(st.integers(1, limits.max_hidden)),
        eps=draw(st.sampled_from((1e-6, 1e-5))),
        with_residual=with_residual,
        exponent=draw(st.integers(-2, 2)),
        seed=draw(seeds),
    )


@dataclass(frozen=True)
class RotaryCase:
    dtype: str
    num_tokens: int
    num_kv_heads: int
    gqa_ratio: int
    head_dim: int
    rotary_dim: int  # <= head_dim, even: partial rotary leaves the tail untouched
    max_position: int
    base: float
    is_neox: bool
    seed: int

    def build(self) -> dict[str, torch.Tensor | bool]:
        gen, td = generator(self.seed), torch_dtype(self.dtype)
        # The standard RoPE table, built here independently of the reference's builder.
        half = self.rotary_dim // 2
        exponents = torch.arange(half, dtype=torch.float64) * 2 / self.rotary_dim
        inv_freq = 1.0 / self.base**exponents
        freqs = torch.arange(self.max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(torch.float32)
        heads = self.num_kv_heads * self.gqa_ratio
        return {
            "positions": torch.randint(0, self.max_position, (self.num_tokens,), generator=gen),
            "query": randn((self.num_tokens, heads, self.head_dim), gen).to(td),
            "key": randn((self.num_tokens, self.num_kv_heads, self.head_dim), gen).to(td),
            "cos_sin_cache": cache,
            "is_neox": self.is_neox,
        }


@st.composite
def rotary_cases(draw, dtype: str, is_neox: bool, limits: Limits = LIMITS["ci"]) -> RotaryCase:
    head_dim = draw(st.sampled_from(HEAD_DIMS))
    fraction = draw(st.sampled_from((1.0, 0.5, 0.25)))
    return RotaryCase(
        dtype=dtype,
        num_tokens=draw(st.integers(1, limits.max_tokens)),
        num_kv_heads=draw(st.integers(1, limits.max_kv_heads)),
        gqa_ratio=draw(st.sampled_from(GQA_RATIOS)),
        head_dim=head_dim,
        rotary_dim=2 * int(head_dim * fraction // 2),
        max_position=draw(st.integers(1, 8192)),
        base=draw(st.sampled_from((10000.0, 500000.0))),
        is_neox=is_neox,
        seed=draw(seeds),
    )


@dataclass(frozen=True)
class SiluCase:
    dtype: str
    lead: tuple[int, ...]  # leading dims of x
    d: int  # x's last dim is 2d
    exponent: int
    seed: int

    def build(self) -> dict[str, torch.Tensor]:
        gen = generator(self.seed)
        x = randn((*self.lead, 2 * self.d), gen, 10.0**self.exponent)
        return {"x": x.to(torch_dtype(self.dtype))}


@st.composite
def silu_cases(draw, dtype: str, limits: Limits = LIMITS["ci"]) -> SiluCase:
    lead = tuple(draw(st.lists(st.integers(1, limits.max_tokens), min_size=1, max_size=2)))
    return SiluCase(
        dtype=dtype,
        lead=lead,
        d=draw(st.integers(1, limits.max_hidden // 2)),
        exponent=draw(st.integers(-1, 1)),
        seed=draw(seeds),
    )


# -- LoRA deltas ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoRACase:
    """A step's multi-LoRA deltas (`Backend.lora_add`): `tokens` rows of x and y, one to three
    parts of y (q / k / v, gate / up, or one), `slots` adapter slots padded to `rank`, each
    token's slot (-1: none), A scaled by 1 / sqrt(K)."""

    dtype: str
    tokens: int
    k: int
    part_sizes: tuple[int, ...]
    slots: int
    rank: int
    token_slots: tuple[int, ...]
    seed: int

    @property
    def parts(self) -> tuple[tuple[int, int], ...]:
        bounds = [0]
        for size in self.part_sizes:
            bounds.append(bounds[-1] + size)
        return tuple(zip(bounds[:-1], bounds[1:], strict=True))

    def build(self) -> dict[str, torch.Tensor]:
        gen, td = generator(self.seed), torch_dtype(self.dtype)
        n, width = sum(self.part_sizes), len(self.part_sizes) * self.slots * self.rank
        b = torch.zeros(n, width)
        for p, (lo, hi) in enumerate(self.parts):
            cols = slice(p * self.slots * self.rank, (p + 1) * self.slots * self.rank)
            b[lo:hi, cols] = randn((hi - lo, self.slots * self.rank), gen)
        return {
            "x": randn((self.tokens, self.k), gen).to(td),
            "y": randn((self.tokens, n), gen).to(td),
            "a": randn((width, self.k), gen, 1.0 / math.sqrt(self.k)).to(td),
            "b": b.to(td),
            "token_slots": torch.tensor(self.token_slots, dtype=torch.int32),
        }


@st.composite
def lora_cases(draw, dtype: str, limits: Limits = LIMITS["ci"]) -> LoRACase:
    # Up to 2 x the kernels' 16-token limit, so both sides of it are drawn.
    tokens = draw(st.integers(1, limits.max_tokens))
    slots = draw(st.integers(1, 4))
    parts = tuple(draw(st.lists(st.integers(1, limits.max_n // 3), min_size=1, max_size=3)))
    return LoRACase(
        dtype=dtype,
        tokens=tokens,
        k=draw(st.integers(1, limits.max_k)),
        part_sizes=parts,
        slots=slots,
        rank=draw(st.sampled_from((1, 4, 8, 16))),
        token_slots=tuple(
            draw(st.lists(st.integers(-1, slots - 1), min_size=tokens, max_size=tokens))
        ),  # fmt: skip
        seed=draw(seeds),
    )


# -- graph capture -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphCase:
    """A small decode-like step (rms_norm -> linear -> silu_and_mul) on static buffers,
    replayed after each of `num_replays` mutations of the inputs."""

    dtype: str
    num_tokens: int
    hidden: int
    intermediate: int
    num_replays: int
    seed: int

    def build(self) -> dict[str, object]:
        gen, td = generator(self.seed), torch_dtype(self.dtype)
        h, i = self.hidden, self.intermediate
        return {
            "x": randn((self.num_tokens, h), gen).to(td),
            "norm_weight": (1.0 + 0.1 * randn((h,), gen)).to(td),
            "weight": randn((2 * i, h), gen, 1.0 / math.sqrt(h)).to(td),
            "new_inputs": [
                randn((self.num_tokens, h), gen).to(td) for _ in range(self.num_replays)
            ],
        }


@st.composite
def graph_cases(draw, dtype: str, limits: Limits = LIMITS["ci"]) -> GraphCase:
    return GraphCase(
        dtype=dtype,
        num_tokens=draw(st.integers(1, limits.max_tokens)),
        hidden=draw(st.integers(1, 256)),
        intermediate=draw(st.integers(1, 128)),
        num_replays=draw(st.integers(1, 3)),
        seed=draw(seeds),
    )
