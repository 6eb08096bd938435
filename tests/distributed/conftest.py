"""Distributed tests on the CPU with gloo: every connection on the loopback address.

gloo binds to the address the hostname resolves to unless GLOO_SOCKET_IFNAME names an interface,
and Ray uses 127.0.0.1 for every node only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; both are
set here, for the tests only (real clusters leave them unset). Workers inherit the environment.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.engine.models_fixtures import _BASE, byte_level_tokenizer

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# GQA down to one KV head (fewer than any TP size > 1: replicated), 3 layers (PP 2 splits 2 + 1),
# tied embeddings (the last stage loads the embedding as its LM head) and biases (a row-parallel
# bias must be added once, after the all-reduce).
DIST_MODEL = dict(
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=1,
    tie_word_embeddings=True,
    attention_bias=True,
    mlp_bias=True,
)


def build_dist_model(folder, seed: int = 0, **overrides) -> None:
    """Save a random float32 Llama with DIST_MODEL's shape (+ tokenizer) to folder."""
    config = AutoConfig.for_model("llama", **{**_BASE, **DIST_MODEL, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # norms at 1 and biases at 0 would hide a stage that skips them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)


@pytest.fixture(scope="session")
def dist_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("dist_llama")
    build_dist_model(folder)
    return str(folder)
