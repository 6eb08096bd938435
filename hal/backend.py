"""The backend interface: every op the engine calls, with its contract.

A backend owns the KV layout and the kernels; the engine only calls these methods. Shapes use
Hugging Face names. All ops take and return torch tensors on the backend's device. The CPU backend
(`backends/cpu`) is the reference each method's docstring describes; others must match it within
the dtype tolerance (bit for bit for the deterministic ops: KV write, quantize).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hal.capabilities import Capabilities
from hal.registry import Selection

# Op families, in report order. Each backend registers at least one candidate per family.
OP_FAMILIES: tuple[str, ...] = (
    "kv_write",
    "attention",
    "gemm",
    "fp8_gemm",
    "fp8_block_gemm",
    "int8_gemm",
    "int4_gemm",
    "gguf_gemm",
    "quantize",
    "rms_norm",
    "rotary",
    "activation",
    "lora",
    "graph",
)


# The GGUF (ggml) block types the gguf_gemm ops take: name -> (values per block, bytes per block),
# as ggml-common.h defines them; the block formulas are in `backends/cpu/gguf.py`.
GGUF_BLOCK_TYPES: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}


@dataclass
class GGUFWeight:
    """A GGUF weight W [out_features, in_features] as `Backend.prepare_gguf` left it: `tensors`
    on the backend's device in the backend's `layout` ("blocks": the raw ggml blocks; a backend
    may repack). The engine registers `tensors` (so the memory plan counts their bytes) and hands
    the object back to `gguf_linear`; only the backend reads the layout and `data` (its own
    per-weight state over the same tensors, e.g. a kernel's checked handle)."""

    qtype: str
    out_features: int
    in_features: int
    layout: str
    tensors: dict[str, torch.Tensor]
    data: object = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class Int4Weight:
    """A 4-bit weight W [out_features, in_features] as `Backend.prepare_int4` left it: `tensors`
    on the backend's device in the backend's `layout` ("canonical": qweight, scales, zeros and
    g_idx as `int4_linear` takes them; a backend may repack, keeping its own form in `data`).
    The engine registers `tensors` (the memory plan counts their bytes) and hands the object back
    to `int4_linear_prepared`; only the backend reads the layout."""

    out_features: int
    in_features: int
    group_size: int
    layout: str
    tensors: dict[str, torch.Tensor]
    data: object = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True, eq=False)
class GGUFDecoderLayer:
    """One Llama-style decoder layer whose four linears are GGUF weights (`prepare_gguf`), for
    `Backend.gguf_decoder_layers`: RMSNorm weights (input, post-attention) and their eps; qkv
    [(num_heads + 2 num_kv_heads) x head_dim, hidden] (the q rows, then k, then v), o, gate_up
    [2 x intermediate, hidden] (gate rows, then up) and down; no biases; attention at `scale`
    with an optional sliding window."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: GGUFWeight
    o: GGUFWeight
    gate_up: GGUFWeight
    down: GGUFWeight
    num_heads: int
    num_kv_heads: int
    scale: float
    sliding_window: int | None = None


@dataclass(eq=False)
class GGUFDecoderStack:
    """A model's decoder layers for `Backend.gguf_decoder_layers`, with the rotary table they
    share; `data` is the backend's own state for the stack (e.g. what it checked once)."""

    layers: tuple[GGUFDecoderLayer, ...]
    cos_sin_cache: torch.Tensor
    is_neox: bool
    data: object = None


@dataclass(eq=False)
class LoRABatch:
    """A step's LoRA adapters as `Backend.lora_add` takes them: each token's slot (int32 [T] on
    the backend's device, -1: the base model alone), the slot count S and the rank R every slot
    is padded to. `cache` holds what a backend derives from the slots once per step (a CUDA
    graph capture records that derivation too, so replays redo it from the static slots)."""

    token_slots: torch.Tensor
    num_slots: int
    rank: int
    cache: dict = field(default_factory=dict)


@dataclass
class BackendInfo:
    """What a backend resolved at construction: its per-family selections."""

    name: str
    device: str
    selections: dict[str, Selection] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)  # e.g. {"tf32": "off"}

    def lines(self) -> list[str]:
        return [s.summary() for s in self.selections.values()]


class GraphRunner(ABC):
    """A captured step for one batch size on static buffers. `replay()` reruns it."""

    @abstractmethod
    def replay(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the captured work on the current contents of the static inputs; return outputs."""


class Backend(ABC):
    """The ops every backend provides. See DESIGN.md "The op contracts"."""

    name: str = "abstract"
    default_device: str = "cpu"  # the torch device type this backend runs on when none is given
    # Whether a GGUF model's LM head should run from its GGUF blocks through `gguf_linear` (the
    # embedding keeps its float weight) rather than from the float weight through `linear`.
    gguf_lm_head: bool = False

    def __init__(
        self,
        caps: Capabilities,
        device: str | torch.device,
        selections: dict[str, Selection] | None = None,
    ) -> None:
        self.caps = caps
        self.device = torch.device(device)
        self.info = BackendInfo(self.name, str(self.device), dict(selections or {}))

    def chosen(self, family: str) -> str:
        """The implementation selected for `family` (tests assert dispatch through this)."""
        sel = self.info.selections.get(family)
        return sel.chosen if sel is not None else "reference"

    # -- KV cache ------------------------------------------------------------------------------
    @abstractmethod
    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scale: float | None = None,
    ) -> None:
        """Scatter new tokens into the paged cache, in place.

        key, value: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size,
        num_kv_heads, head_dim]; slot_mapping: int64 [num_tokens], slot = block * block_size +
        offset, -1 skips the token (padding). With an FP8 cache, stored = fp8(x / kv_scale).
        """

    @abstractmethod
    def copy_blocks(self, caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        """For each cache tensor, copy block src[i] to block dst[i] (copy-on-write), in place."""

    # -- attention -----------------------------------------------------------------------------
    @abstractmethod
    def attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        scale: float,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
        kv_scale: float | None = None,
        max_query_len: int | None = None,
        max_seq_len: int | None = None,
    ) -> torch.Tensor:
        """Paged, varlen, causal attention for prefill, chunked prefill and decode alike.

        query: [num_tokens, num_heads, head_dim], packed per sequence; query_start_loc: int32
        [num_seqs + 1]; seq_lens: int32 [num_seqs], the total KV length of each sequence including
        its new tokens (already written to the cache); block_tables: int32 [num_seqs,
        max_blocks]. Query token j of sequence s (query_len q_s) sits at position
        p = seq_lens[s] - q_s + j and sees KV positions k with k <= p and, with a sliding window
        w, p - k < w. Head h reads KV head h // (num_heads // num_kv_heads). Scores are
        scale * q.k, then soft_cap * tanh(score / soft_cap) when soft_cap is set.
        max_query_len / max_seq_len: optional host-side hints (Python ints, upper bounds of the
        longest query and KV length; never read back from tensors) that let a kernel pick its
        decode path and split-KV count; a captured graph passes fixed bounds. Backends may ignore
        them. Returns [num_tokens, num_heads, head_dim] in query's dtype.
        """

    # -- linear --------------------------------------------------------------------------------
    @abstractmethod
    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """y = x @ weight.T + bias. x: [..., K]; weight: [N, K]. TF32 per the backend's policy."""

    @abstractmethod
    def fp8_linear(
        self,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        w_q: torch.Tensor,
        w_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """y = (x_q * x_scale) @ (w_q * w_scale).T + bias with fp32 accumulation.

        x_q: fp8 [M, K]; x_scale: fp32 [1] (per tensor) or [M, 1] (per token); w_q: fp8 [N, K];
        w_scale: fp32 [1] or [N, 1] (per output channel).
        Block-scaled (FP8 block checkpoints; the "fp8_block_gemm" family): x_scale [M, G] and
        w_scale [N / R, G] (R consecutive rows share a scale, R dividing N), K = G * B: block
        g's fp32 sum over its B columns times x_scale[m, g] * w_scale[n // R, g], the blocks
        summed in fp32.
        """

    @abstractmethod
    def int8_linear(
        self,
        x_q: torch.Tensor,
        x_scale: torch.Tensor,
        w_q: torch.Tensor,
        w_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """W8A8: y = (x_q @ w_q.T in int32) * x_scale * w_scale.T + bias.

        x_q: int8 [M, K]; x_scale: fp32 [1] or [M, 1]; w_q: int8 [N, K]; w_scale: [1] or [N, 1].
        """

    @abstractmethod
    def int4_linear(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        g_idx: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """4-bit weight-only GEMM in the HAL's canonical layout (see `dequantize_int4`).

        x: [M, K] float; returns [M, N] in x's dtype.
        """

    def prepare_int4(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        g_idx: torch.Tensor | None = None,
    ) -> Int4Weight:
        """Once, at load: a 4-bit weight in the canonical layout (`int4_linear`'s arguments),
        moved to the device and repacked however `int4_linear_prepared` runs fastest here,
        losslessly. This default keeps the canonical layout."""
        tensors = {"qweight": qweight, "scales": scales, "zeros": zeros}
        if g_idx is not None:
            tensors["g_idx"] = g_idx
        tensors = {key: t.to(self.device).contiguous() for key, t in tensors.items()}
        n, k = qweight.shape[1], qweight.shape[0] * 8
        return Int4Weight(n, k, group_size, "canonical", tensors)

    def int4_linear_prepared(
        self, x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`int4_linear` on a weight from `prepare_int4`: the same math and rounding.
        x: [M, K] float; returns [M, N] in x's dtype."""
        if weight.layout != "canonical":
            raise ValueError(
                f"weight: layout {weight.layout!r}; the {self.name} backend runs 'canonical' "
                "(prepare the weight with this backend's prepare_int4)"
            )
        t = weight.tensors
        return self.int4_linear(
            x, t["qweight"], t["scales"], t["zeros"], weight.group_size, t.get("g_idx"), bias
        )

    @abstractmethod
    def prepare_gguf(
        self,
        blocks: torch.Tensor,
        qtype: str,
        out_features: int,
        in_features: int,
        role: str = "linear",
    ) -> GGUFWeight:
        """Once, at load: a GGUF weight W [N, K] from its raw blocks uint8 [N, K / block_size *
        type_size] (qtype one of GGUF_BLOCK_TYPES; K a multiple of its block size), moved to the
        device and repacked however `gguf_linear` runs fastest here. role "lm_head": an LM head
        whose model keeps a float copy of the same weight (its embedding), so a backend need
        not keep another. Bad blocks: ValueError."""

    @abstractmethod
    def gguf_linear(
        self, x: torch.Tensor, weight: GGUFWeight, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """y = x @ W.T + bias with W dequantized exactly per the ggml block formulas (the
        reference: `backends.cpu.gguf.dequantize_gguf`, fp32), fp32 accumulation (a backend may
        offer a documented, opt-in lower-precision path). x: [..., K] float; weight from
        `prepare_gguf`; returns [..., N] in x's dtype."""

    # -- quantize / dequantize -----------------------------------------------------------------
    @abstractmethod
    def quantize_fp8(
        self,
        x: torch.Tensor,
        fp8_dtype: torch.dtype,
        scale: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [M, K] -> (q fp8 [M, K], scale fp32 [1] or [M, 1]).

        Static when `scale` is given; else dynamic with scale = max(absmax, eps) / fp8_max per
        tensor or per row. q = fp8(clamp(x / scale, -fp8_max, fp8_max)), rounding to nearest even.
        """

    @abstractmethod
    def dequantize_fp8(
        self, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """x = q * scale (scale broadcast: [1], [M, 1] or [N, 1])."""

    @abstractmethod
    def quantize_int8(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, per_token: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric int8: scale = max(absmax, eps) / 127, q = clamp(round_half_even(x / scale),
        -128, 127). Returns (q int8, scale fp32 [1] or [M, 1])."""

    @abstractmethod
    def quantize_int4(
        self, weight: torch.Tensor, group_size: int, symmetric: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Group-wise 4-bit quantization of weight [N, K] (K % group_size == 0, K % 8 == 0).

        Asymmetric (GPTQ's range, which always holds 0): per group lo = min(min, 0),
        hi = max(max, 0), scale = max(hi - lo, eps) / 15 rounded to weight's dtype,
        zero = clamp(round(-lo / scale), 0, 15); symmetric: scale = absmax / 7.5 (floored at
        eps), zero = 8. q = clamp(round(w / scale) +
        zero, 0, 15). Returns the canonical layout (qweight, scales, zeros): qweight int32
        [K / 8, N], nibble i of word r holding row k = 8r + i at bits 4i (the GPTQ order);
        scales [K / G, N] in weight's dtype; zeros uint8 [K / G, N] (unpacked, no offset).
        """

    @abstractmethod
    def dequantize_int4(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        g_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Canonical layout -> weight [N, K]: W[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n]
        with g = g_idx[k] if given else k // group_size. Returns scales' dtype."""

    # -- fused small ops -----------------------------------------------------------------------
    @abstractmethod
    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in x's dtype.

        With residual: h = x + residual (rounded to x's dtype), returns (rms_norm(h), h).
        """

    def rms_norm_quant_fp8(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        fp8_dtype: torch.dtype,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """`rms_norm`, then `quantize_fp8` of its output per token (what an FP8 linear with
        dynamic per-token activations reads next). x, residual: [T, hidden]. Returns (q fp8
        [T, hidden], scale fp32 [T, 1]), and h (the residual sum) third with a residual.
        Exactly this composition; a backend may override it with a fused kernel that gives
        the same bits."""
        out = self.rms_norm(x, weight, eps, residual)
        y, h = out if residual is not None else (out, None)
        q, scale = self.quantize_fp8(y, fp8_dtype, per_token=True)
        return (q, scale) if h is None else (q, scale, h)

    # -- tensor-parallel all-reduce over peer-mapped memory (optional) -------------------------
    def peer_all_reduce_reason(self) -> str | None:
        """Why this backend has no one-shot all-reduce kernel over buffers its GPU can read on
        every rank of a tensor-parallel group (None: it has one; see make_peer_all_reduce)."""
        return f"the {self.name} backend has no one-shot all-reduce kernel"

    def peer_all_reduce_buffer_bytes(
        self, world: int, capacity_bytes: int, max_programs: int
    ) -> int:
        """Bytes of the buffer each rank maps for make_peer_all_reduce (all-reduces of up to
        capacity_bytes)."""
        raise NotImplementedError(self.peer_all_reduce_reason())

    def make_peer_all_reduce(
        self, rank: int, world: int, buffer_ptrs: list[int], capacity_bytes: int, max_programs: int
    ):
        """The kernel's workspace over every rank's buffer (zeroed before first use; buffer_ptrs:
        their addresses as this process sees them): an object with fits(x), all_reduce(x),
        all_reduce_rms_norm(x, residual, weight, eps, fp8_dtype=None), check() and spin_limit;
        optionally ll_push(rows, cols, dtype) / mark_pushed(y), with the backend's
        linear_push(x, weight, target): a row-parallel GEMM that sends the all-reduce's words
        itself (the CUDA backend). Collective in use: every rank makes the same calls in the same
        order."""
        raise NotImplementedError(self.peer_all_reduce_reason())

    @abstractmethod
    def rotary(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        is_neox: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary position embedding on the first rotary_dim of each head.

        positions: int64 [num_tokens]; query: [num_tokens, num_heads, head_dim]; key:
        [num_tokens, num_kv_heads, head_dim]; cos_sin_cache: fp32 [max_position, rotary_dim],
        cos in the first half, sin in the second. NeoX style rotates (x[:d/2], x[d/2:]) pairs,
        GPT-J style rotates interleaved (x[0::2], x[1::2]) pairs. Returns new (query, key).
        """

    def rotary_write_kv(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        is_neox: bool,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`rotary` on (query, key), then `write_kv` of the rotated key and `value`; returns the
        rotated (query, key). Exactly the composition below (every contract of both ops holds:
        partial rotary_dim, slot -1 skips, FP8 cache stores fp8(k / kv_scale)); a backend may
        override it with a fused kernel that gives the same bits.

        positions, slot_mapping: int [num_tokens]; query: [num_tokens, num_heads, head_dim];
        key, value: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size,
        num_kv_heads, head_dim]; cos_sin_cache: fp32 [max_position, rotary_dim].
        """
        query, key = self.rotary(positions, query, key, cos_sin_cache, is_neox)
        self.write_kv(key, value, key_cache, value_cache, slot_mapping, kv_scale)
        return query, key

    @abstractmethod
    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., 2d] -> silu(x[..., :d]) * x[..., d:], computed in fp32, in x's dtype."""

    def silu_and_mul_quant_fp8(
        self, x: torch.Tensor, fp8_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`silu_and_mul`, then `quantize_fp8` of its output per token (an FP8 down
        projection's input): x [T, 2d] -> (q fp8 [T, d], scale fp32 [T, 1]). Exactly this
        composition; a backend may override it with a fused kernel that gives the same bits."""
        return self.quantize_fp8(self.silu_and_mul(x), fp8_dtype, per_token=True)

    def linear_silu_and_mul(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`silu_and_mul(linear(x, weight, bias))`: a SwiGLU MLP's gate_up projection and its
        activation (x [..., K]; weight [2D, K], the D gate rows then the D up rows; bias [2D])
        -> [..., D]. Exactly this composition; a backend may override it with a fused kernel
        that gives the same bits."""
        return self.silu_and_mul(self.linear(x, weight, bias))

    @abstractmethod
    def lora_add(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        batch: LoRABatch,
        parts: tuple[tuple[int, int], ...],
    ) -> torch.Tensor:
        """y += each token's LoRA delta, in place (multi-LoRA: every token its own adapter).

        x [T, K], y [T, N] (x's dtype). The P = len(parts) parts of y (output rows
        parts[p] = (start, stop)) each have, for every slot s of the S = batch.num_slots, an
        adapter pair padded to rank R = batch.rank: A rows a[(p S + s) R : (p S + s + 1) R]
        ([P S R, K]) and B columns b[start:stop, (p S + s) R : ...] ([N, P S R], zero
        elsewhere). For a token t of slot s >= 0 and each part p, y[t, start:stop] +=
        B_ps (A_ps x[t]); tokens of slot -1 keep y's bits. Reference: h and the delta
        in fp32 over every slot with the other slots' h masked to zero, y rounded once
        (`backends.cpu.linear.lora_add`). Returns y."""

    def linear_rotary_write_kv(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        num_heads: int,
        num_kv_heads: int,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        is_neox: bool,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An attention layer's qkv projection, then `rotary_write_kv` of its heads: `linear(x,
        weight, bias)` split into q [T, num_heads, D], k and v [T, num_kv_heads, D] (D the
        caches' head_dim; weight [(num_heads + 2 num_kv_heads) D, K], the q rows, then k, then
        v), q and k rotated, the rotated k and v written to the caches; returns the rotated
        (query, key) (views of one [T, N] tensor are fine). x: [T, K]; the rest as in
        `rotary_write_kv`. Exactly this composition; a backend may override it with a fused
        kernel that gives the same bits."""
        if x.dim() != 2:
            raise ValueError(f"x: expected [num_tokens, K], got shape {tuple(x.shape)}")
        d = key_cache.shape[-1]
        if weight.dim() != 2 or weight.shape[0] != (num_heads + 2 * num_kv_heads) * d:
            raise ValueError(
                f"weight: shape {tuple(weight.shape)}; expected [(num_heads {num_heads} + 2 x "
                f"num_kv_heads {num_kv_heads}) x head_dim {d}, K] (the caches' head_dim)"
            )
        qkv = self.linear(x, weight, bias).view(x.shape[0], -1, d)
        q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
        return self.rotary_write_kv(positions, q, k, v, cos_sin_cache, is_neox, key_cache,
                                    value_cache, slot_mapping, kv_scale)  # fmt: skip

    # Whether `gguf_decoder_layers` is more than the composition here (the engine calls it for
    # whole GGUF decoder stacks only where a backend says so; elsewhere its modules run the ops).
    fused_gguf_decoder: bool = False

    def gguf_decoder_layers(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        stack: GGUFDecoderStack,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        max_query_len: int | None = None,
        max_seq_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama-style decoder layers on GGUF weights over the packed tokens: for each layer and
        its (key, value) caches, x = rms_norm(hidden) with residual = hidden when residual is
        None, else (x, residual) = rms_norm(hidden, residual); q, k, v = gguf_linear(x, qkv)
        split by heads; q rotated and k, v written by `rotary_write_kv`; a = attention(q, ...)
        flattened; h = gguf_linear(a, o); (x, residual) = rms_norm(h, residual); hidden =
        gguf_linear(silu_and_mul(gguf_linear(x, gate_up)), down). Returns (hidden, residual)
        after the last layer (the final norm is the caller's). hidden [T, hidden_size]; the rest
        as `rotary_write_kv` and `attention` take them. Exactly this composition; a backend may
        override it with a fused path that gives the same bits."""
        t = hidden.shape[0]
        if len(kv_caches) != len(stack.layers):
            raise ValueError(
                f"kv_caches: {len(kv_caches)} layers, the stack has {len(stack.layers)}"
            )
        for layer, (key_cache, value_cache) in zip(stack.layers, kv_caches, strict=True):
            if residual is None:
                x, residual = self.rms_norm(hidden, layer.input_norm, layer.eps), hidden
            else:
                x, residual = self.rms_norm(hidden, layer.input_norm, layer.eps, residual)
            d = key_cache.shape[-1]
            qkv = self.gguf_linear(x, layer.qkv).view(t, -1, d)
            q, k, v = qkv.split([layer.num_heads, layer.num_kv_heads, layer.num_kv_heads], dim=1)
            q, _ = self.rotary_write_kv(positions, q, k, v, stack.cos_sin_cache, stack.is_neox,
                                        key_cache, value_cache, slot_mapping)  # fmt: skip
            a = self.attention(q, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                               layer.scale, sliding_window=layer.sliding_window,
                               max_query_len=max_query_len, max_seq_len=max_seq_len)  # fmt: skip
            h = self.gguf_linear(a.reshape(t, layer.num_heads * d), layer.o)
            x, residual = self.rms_norm(h, layer.post_norm, layer.eps, residual)
            hidden = self.gguf_linear(self.silu_and_mul(self.gguf_linear(x, layer.gate_up)),
                                      layer.down)  # fmt: skip
        return hidden, residual

    # -- graphs ----------------------------------------------------------------------------------
    def decode_context_bounds(
        self, num_seqs: int, num_kv_heads: int, block_size: int, max_model_len: int
    ) -> tuple[int, ...]:
        """Context lengths below max_model_len up to which this backend's decode attention for
        num_seqs sequences (num_kv_heads each, on this rank) launches a cheaper set of kernels
        (e.g. no split-KV combine), ascending. Decode graphs capture that batch size once per
        bound, as the `max_seq_len` hint, and once for max_model_len, and a step replays the
        capture of the smallest bound >= its longest context. Default: none (one capture)."""
        return ()

    @abstractmethod
    def capture_graph(
        self, fn: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]], pool: object | None = None
    ) -> GraphRunner:
        """Capture `fn` (which reads static input buffers it closes over) for replay.

        Backends without graphs return a runner that calls `fn` eagerly.
        """

    # -- description -----------------------------------------------------------------------------
    def describe(self) -> list[str]:
        """One line per op family: the implementation chosen and why others were passed over."""
        return self.info.lines()
