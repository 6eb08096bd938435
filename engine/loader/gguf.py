"""GGUF files (llama architecture): metadata -> ModelConfig, tensors dequantized per shard.

Weights are dequantized with the `gguf` package, as transformers does, and renamed to Hugging Face
names. llama.cpp's converter permutes the rows of q and k (and their biases) inside each head so
its GPT-J-style rotary works; we undo it to get the HF (NeoX-style) layout back.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.model_config import ModelConfig
from engine.parallel import WeightLoadError

logger = logging.getLogger(__name__)

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
    """A `TensorSource` over one GGUF file; reads metadata once and dequantizes on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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

    def config(self) -> ModelConfig:
        meta = dict(self.metadata)
        arch = meta.get("general.architecture")
        if f"{arch}.vocab_size" not in meta and self.num_tokens:
            meta[f"{arch}.vocab_size"] = self.num_tokens
        config = ModelConfig.from_gguf_metadata(meta, self.gguf_names, source=str(self.path))
        self.head_dim = config.head_dim
        return config

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
        permuted = ".q_proj." in name or ".k_proj." in name
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
