"""Hugging Face folders: config.json and *.safetensors (with or without an index), read per shard.

Each tensor is read through `safe_open(...).get_slice`, so a tensor-parallel rank reads only the
rows or columns it holds. Every failure names the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.model_config import ModelConfig, ModelConfigError
from engine.parallel import WeightLoadError

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
LEGACY_GPTQ_CONFIG = "quantize_config.json"


def read_hf_config(folder: str | Path) -> ModelConfig:
    """Parse `folder/config.json` into a ModelConfig (clear error if absent or not JSON)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{path}: missing (a Hugging Face model folder needs config.json)")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    legacy = Path(folder) / LEGACY_GPTQ_CONFIG
    if "quantization_config" not in data and legacy.is_file():
        # Older AutoGPTQ folders keep the GPTQ settings only in quantize_config.json.
        try:
            quant = json.loads(legacy.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelConfigError(f"{legacy}: not valid JSON ({e})") from e
        if isinstance(quant, dict):
            data["quantization_config"] = {"quant_method": "gptq", **quant}
            logger.info("%s: GPTQ settings read from %s", path, legacy.name)
    return ModelConfig.from_hf_dict(data, source=str(path))


class SafetensorsSource:
    """A `TensorSource` over the safetensors files of one folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        files = self._weight_files()
        self._handles: dict[Path, Any] = {}
        self._file_of: dict[str, Path] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
                keys = list(handle.keys())
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise WeightLoadError(f"{file}: not a valid safetensors file ({e})") from e
            self._handles[file] = handle
            for key in keys:
                self._file_of[key] = file
        self._check_index(files)

    def _weight_files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise WeightLoadError(f"{index}: not a valid safetensors index ({e})") from e
            self._index: dict[str, str] | None = weight_map
            files = sorted({self.folder / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise WeightLoadError(f"{index}: lists weight files that are missing: {missing}")
            return files
        self._index = None
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            others = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(
                p.name for p in self.folder.glob("*.pt")
            )
            hint = f" (found {others}; only safetensors is supported)" if others else ""
            raise WeightLoadError(f"{self.folder}: no *.safetensors weight files{hint}")
        return files

    def _check_index(self, files: list[Path]) -> None:
        if self._index is None:
            return
        for name, file in self._index.items():
            if self._file_of.get(name) != self.folder / file:
                raise WeightLoadError(
                    f"{self.folder / file}: tensor {name!r} is listed in {INDEX_FILE} but not "
                    "stored in that file"
                )

    # -- TensorSource ----------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._file_of

    def location(self, name: str) -> str:
        file = self._file_of.get(name)
        if file is not None:
            return str(file)
        return str(self.folder / INDEX_FILE) if self._index is not None else str(self.folder)

    def _file(self, name: str) -> Path:
        if name not in self._file_of:
            names = ", ".join(sorted(p.name for p in self._handles))
            raise WeightLoadError(f"{self.folder}: tensor {name!r} is missing (searched {names})")
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._file(name)
        try:
            return tuple(self._handles[file].get_slice(name).get_shape())
        except Exception as e:
            raise WeightLoadError(f"{file}: tensor {name!r} header unreadable ({e})") from e

    def read(
        self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        file = self._file(name)
        handle = self._handles[file]
        try:
            if dim is None:
                return handle.get_tensor(name)
            tensor_slice = handle.get_slice(name)
            index = [slice(None)] * len(tensor_slice.get_shape())
            index[dim] = slice(start, stop)
            return tensor_slice[tuple(index)]
        except Exception as e:
            raise WeightLoadError(f"{file}: tensor {name!r} could not be read ({e})") from e
