"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest
from models_fixtures import build_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """The tiny random Llama folder (float32 weights, byte-level tokenizer), built once."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    build_model("llama", folder)
    return folder
