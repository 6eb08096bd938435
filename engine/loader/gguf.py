"""GGUF files (llama, qwen2 and qwen3 architectures): metadata -> ModelConfig, tensors read per
shard.

Linear weights of a block type the HAL's gguf_gemm ops take (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) are
read as their raw ggml blocks (`read_blocks`) and stay quantized (engine.quantization.gguf);
everything else is dequantized with the `gguf` package, as transformers does (`read`).
HAL_GGUF_DEQUANTIZE=1 (or `GGUFSource(path, dequantize=True)`) dequantizes every tensor at load,
the behaviour before blocks were kept. Names become Hugging Face names. llama.cpp's converter
permutes the rows of q and k (and their biases) inside each head of llama-architecture files so
its GPT-J-style rotary works; we undo it (on float rows or whole block rows alike) to get the HF
(NeoX-style) layout back. qwen2 / qwen3 files keep the HF layout (llama.cpp ropes them NeoX-style).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.model_config import ModelConfig
from engine.parallel import WeightLoadError
from hal.backend import GGUF_BLOCK_TYPES
from hal.env import env_flag

logger = logging.getLogger(__name__)

# Set to 1 to dequantize every GGUF tensor at load (float weights, as transformers loads them).
DEQUANTIZE_ENV = "HAL_GGUF_DEQUANTIZE"


def dequantize_requested(dequantize: bool | None = None) -> bool:
    """`dequantize` if given, else HAL_GGUF_DEQUANTIZE (default off: keep block weights)."""
    if dequantize is not None:
        return dequantize
    return bool(env_flag(DEQUANTIZE_ENV))


_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Arrays the model config does not need; decoding them is skipped (the tokenizer reads them).
_SKIP_DECODE = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (`blk.3.attn_q.weight` -> layer 3's q_proj)."""
    match = _BLOCK_RE.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        mapped = _BLOCK_NAMES.get(part)
        return None if mapped is None else f"model.layers.{layer}.{mapped}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    mapped = _GLOBAL_NAMES.get(base)
    return None if mapped is None else f"{mapped}.{kind}"


def _unpermute_rows(w: np.ndarray, head_dim: int) -> np.ndarray:
    """Undo llama.cpp's per-head q/k row permutation on whole heads: w [heads * head_dim, ...]."""
    heads = w.shape[0] // head_dim
    rest = w.shape[1:]
    # llama.cpp wrote reshape(heads, 2, head_dim / 2).swapaxes(1, 2); this is its inverse.
    return w.reshape(heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _column_bytes(
    ggml_type, dtype: np.dtype, start: int, stop: int | None, num_cols: int
) -> slice | None:
    """The slice of a row's stored items holding columns [start, stop), or None if a quantization
    block straddles either end (then the whole row is unpacked and sliced afterwards)."""
    from gguf.constants import GGML_QUANT_SIZES

    stop = num_cols if stop is None else stop
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if start % block_size or stop % block_size:
        return None
    if dtype == np.uint8:  # quantized: rows are raw bytes, type_size per block
        return slice(start // block_size * type_size, stop // block_size * type_size)
    return slice(start, stop)  # float tensors are stored as typed elements


class GGUFSource:
    """A `TensorSource` over one GGUF file; reads metadata once, tensors on demand: `read`
    dequantizes, `read_blocks` gives a block-quantized weight's raw ggml blocks.

    dequantize=None reads HAL_GGUF_DEQUANTIZE; True makes `config()` ask for no block weights.
    """

    def __init__(self, path: str | Path, dequantize: bool | None = None) -> None:
        self.path = Path(path)
        self.dequantize = dequantize_requested(dequantize)
        if not self.path.is_file():
            raise WeightLoadError(f"{self.path}: GGUF file not found")
        try:
            from gguf import GGUFReader

            self.reader = GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError/struct errors on bad files
            raise WeightLoadError(f"{self.path}: not a readable GGUF file ({e})") from e
        self.metadata: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key in _SKIP_DECODE:
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception as e:
                raise WeightLoadError(f"{self.path}: metadata {key!r} unreadable ({e})") from e
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        self.num_tokens = len(tokens.data) if tokens is not None else 0
        self.gguf_names = {t.name for t in self.reader.tensors}
        self._tensors = {}
        for tensor in self.reader.tensors:
            name = hf_name(tensor.name)
            if name is None:
                logger.debug("%s: ignoring tensor %s", self.path.name, tensor.name)
                continue
            self._tensors[name] = tensor
        self.head_dim: int | None = None  # set by config(); needed to undo the q/k permutation
        # llama.cpp permutes q/k rows of llama-architecture files only
        self.permutes_qk = self.metadata.get("general.architecture") == "llama"

    def config(self) -> ModelConfig:
        meta = dict(self.metadata)
        arch = meta.get("general.architecture")
        if f"{arch}.vocab_size" not in meta and self.num_tokens:
            meta[f"{arch}.vocab_size"] = self.num_tokens
        config = ModelConfig.from_gguf_metadata(meta, self.gguf_names, source=str(self.path))
        self.head_dim = config.head_dim
        types = self.tensor_types()
        if self.dequantize or not any(t in GGUF_BLOCK_TYPES for t in types.values()):
            return config
        # Block weights stay quantized: engine.quantization's "gguf" method reads the types.
        quant = {"quant_method": "gguf", "tensor_types": types}
        return dataclasses.replace(config, quantization_config=quant)

    def tensor_type(self, name: str) -> str:
        """The GGML type of tensor `name`: "F32", "F16", "BF16", "Q4_1", "Q6_K", ..."""
        return self._tensor(name).tensor_type.name

    def tensor_types(self) -> dict[str, str]:
        """{Hugging Face name: GGML type} of every tensor the model reads."""
        return {name: t.tensor_type.name for name, t in self._tensors.items()}

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    # -- TensorSource ----------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._tensors

    def location(self, name: str) -> str:
        tensor = self._tensors.get(name)
        return f"{self.path} ({tensor.name})" if tensor is not None else str(self.path)

    def _tensor(self, name: str):
        if name not in self._tensors:
            raise WeightLoadError(f"{self.path}: tensor {name!r} is missing")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first (ne[0] = columns); torch wants the reverse.
        return tuple(int(n) for n in reversed(self._tensor(name).shape.tolist()))

    def read(
        self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        from gguf import quants

        tensor = self._tensor(name)
        permuted = self.permutes_qk and (".q_proj." in name or ".k_proj." in name)
        try:
            data = np.asarray(tensor.data)  # plain view: numpy.memmap slicing is slow per row
            shape = list(self.shape(name))
            if dim == 0:  # quantized blocks never span rows, so slice rows before unpacking
                data = data[start:stop]
                shape[0] = data.shape[0]
            elif dim == 1 and not permuted and data.ndim == 2:
                cols = _column_bytes(tensor.tensor_type, data.dtype, start, stop, shape[1])
                if cols is not None:  # block-aligned: unpack only this rank's columns
                    data = data[:, cols]
                    shape[1] = (stop if stop is not None else shape[1]) - start
                    dim = None
            w = quants.dequantize(data, tensor.tensor_type)  # fp32 [rows, cols] or [n]
            w = w.reshape(shape)
        except Exception as e:
            raise WeightLoadError(
                f"{self.location(name)}: tensor {name!r} could not be dequantized ({e})"
            ) from e
        if permuted:
            if self.head_dim is None:
                raise RuntimeError("GGUFSource.config() must run before reading q/k tensors")
            if w.shape[0] % self.head_dim or (dim == 0 and start % self.head_dim):
                raise WeightLoadError(
                    f"{self.location(name)}: q/k rows [{start}:{stop}] do not cover whole heads "
                    f"of head_dim {self.head_dim}"
                )
            w = _unpermute_rows(w, self.head_dim)
        if dim not in (None, 0):
            index = [slice(None)] * w.ndim
            index[dim] = slice(start, stop)
            w = w[tuple(index)]
        w = np.ascontiguousarray(w)
        return torch.from_numpy(w if w.flags.writeable else w.copy())

    def read_blocks(
        self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """The raw ggml blocks of block-quantized weight `name` [rows, cols] as uint8 [rows,
        cols / block_size * type_size], or of its rows [start, stop) (dim 0, any rows; whole
        heads for q/k) or columns [start, stop) (dim 1, at block boundaries), q/k rows
        un-permuted. The type is `tensor_type(name)`, one of hal.backend.GGUF_BLOCK_TYPES."""
        tensor = self._tensor(name)
        qtype = tensor.tensor_type.name
        where = self.location(name)
        if qtype not in GGUF_BLOCK_TYPES:
            raise WeightLoadError(
                f"{where}: tensor {name!r} is {qtype}, not a block type kept quantized "
                f"({', '.join(GGUF_BLOCK_TYPES)}); read it dequantized with read()"
            )
        shape = self.shape(name)
        block_size, type_size = GGUF_BLOCK_TYPES[qtype]
        data = np.asarray(tensor.data)  # uint8 [rows, bytes_per_row], a view of the file
        if len(shape) != 2 or shape[1] % block_size:
            raise WeightLoadError(
                f"{where}: tensor {name!r} of shape {list(shape)} is not a 2-D weight of whole "
                f"{qtype} blocks ({block_size} values)"
            )
        rows, cols = shape
        expected = (rows, cols // block_size * type_size)
        if data.dtype != np.uint8 or tuple(data.shape) != expected:
            raise WeightLoadError(
                f"{where}: tensor {name!r} holds {data.dtype} {list(data.shape)}, expected "
                f"uint8 {list(expected)} for {qtype} [{rows}, {cols}]"
            )
        permuted = self.permutes_qk and (".q_proj." in name or ".k_proj." in name)
        if dim == 0:
            stop = rows if stop is None else stop
            if not 0 <= start <= stop <= rows:
                raise ValueError(f"rows [{start}:{stop}] lie outside tensor {name!r}'s {rows}")
            data = data[start:stop]
        elif dim == 1:
            stop = cols if stop is None else stop
            if not 0 <= start <= stop <= cols:
                raise ValueError(f"columns [{start}:{stop}] lie outside tensor {name!r}'s {cols}")
            if start % block_size or stop % block_size:
                raise WeightLoadError(
                    f"{where}: tensor {name!r} columns [{start}:{stop}] cut through {qtype} "
                    f"blocks of {block_size} values; slice K at multiples of {block_size}"
                )
            data = data[:, start // block_size * type_size : stop // block_size * type_size]
        elif dim is not None:
            raise ValueError(f"dim: {dim} is not 0 (rows), 1 (columns) or None")
        if permuted:
            if self.head_dim is None:
                raise RuntimeError("GGUFSource.config() must run before reading q/k tensors")
            if data.shape[0] % self.head_dim or (dim == 0 and start % self.head_dim):
                raise WeightLoadError(
                    f"{where}: q/k rows [{start}:{stop}] do not cover whole heads of head_dim "
                    f"{self.head_dim}"
                )
            data = _unpermute_rows(data, self.head_dim)  # row-wise: whole block rows move
        return torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))
