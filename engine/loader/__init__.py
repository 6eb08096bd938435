"""Load a model for the engine: a Hugging Face folder, a .gguf file, or the embedded default.

`load_model` returns (model, model_config, tokenizer). Weights are read per tensor-parallel shard
and cast to the chosen dtype (float32, bfloat16, float16; default per device).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from engine.loader.default_model import default_model_path
from engine.loader.gguf import GGUFSource
from engine.loader.hf import SafetensorsSource, read_hf_config
from engine.loader.random_weights import RandomSource
from engine.model_config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.parallel import SINGLE, ParallelContext, WeightLoadError
from engine.tokenizer import load_tokenizer
from hal.backend import Backend
from hal.errors import HalError

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_CAPS_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

__all__ = ["DTYPES", "LOAD_FORMATS", "load_model", "resolve_dtype"]

LOAD_FORMATS = ("auto", "dummy")


def resolve_dtype(dtype: str | torch.dtype | None, backend: Backend) -> torch.dtype:
    """The model dtype: as asked, or by default float32 on CPU, else bfloat16 where native, else
    float16. A dtype the device cannot run is an error naming the way out."""
    if dtype is None or dtype == "auto":
        if backend.caps.vendor == "cpu":
            return torch.float32
        if backend.caps.supports("bf16", native=True):
            return torch.bfloat16
        return torch.float16 if backend.caps.supports("fp16") else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    if dtype not in _CAPS_NAME:
        raise ValueError(f"dtype: {dtype} is not one of float32, bfloat16, float16")
    name = _CAPS_NAME[dtype]
    if name != "fp32" and not backend.caps.supports(name):
        way_out = (
            "use float16" if name == "bf16" and backend.caps.supports("fp16") else "use float32"
        )
        raise HalError(
            f"dtype: {name} is not supported on {backend.caps.device_name} "
            f"({backend.caps.arch}); {way_out}"
        )
    return dtype


def load_model(
    path: str | Path | None,
    backend: Backend,
    dtype: str | torch.dtype | None = None,
    parallel: ParallelContext = SINGLE,
    max_model_len: int | None = None,
    with_tokenizer: bool = True,
    load_format: str = "auto",
    seed: int = 0,
    quantization: str | None = None,
) -> tuple[LlamaForCausalLM, ModelConfig, Any]:
    """Build and fill the model from `path` (folder or .gguf; None: the embedded default).

    load_format "dummy" reads only the folder's config.json (and tokenizer) and draws random
    weights on the device (benchmarks at real sizes). Returns (model, model_config, tokenizer);
    tokenizer is None when `with_tokenizer` is False. A checkpoint's quantization_config (GPTQ,
    AWQ, ...) is applied as it is; `quantization` ("fp8") quantizes a float checkpoint at load.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format: {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise WeightLoadError(f"{path}: no such model folder or GGUF file")
    torch_dtype = resolve_dtype(dtype, backend)
    start = time.perf_counter()
    chat_template = None
    if path.is_file():
        if load_format == "dummy":
            raise WeightLoadError(
                f"{path}: load_format='dummy' takes a Hugging Face folder (its config.json gives "
                "the shapes), not a file"
            )
        if path.suffix != ".gguf":
            raise WeightLoadError(
                f"{path}: a model file must be .gguf; for safetensors pass the model's folder"
            )
        gguf = GGUFSource(path)
        config = gguf.config()
        source = gguf
        chat_template = gguf.chat_template
    elif load_format == "dummy":
        config = read_hf_config(path)
        source = RandomSource(config, backend.device, torch_dtype, seed)
    else:
        config = read_hf_config(path)
        source = SafetensorsSource(path)
    model = LlamaForCausalLM(config, backend, torch_dtype, parallel, max_model_len, quantization)
    model.load_weights(source)
    model.eval()
    logger.info(
        "loaded %s (%s, %d layers) from %s as %s in %.1fs (tp rank %d/%d)",
        config.architecture,
        "GGUF" if path.is_file() else "random" if load_format == "dummy" else "safetensors",
        config.num_layers,
        path,
        str(torch_dtype).removeprefix("torch."),
        time.perf_counter() - start,
        parallel.tp_rank,
        parallel.tp_size,
    )
    tokenizer = load_tokenizer(path, chat_template) if with_tokenizer else None
    return model, config, tokenizer
