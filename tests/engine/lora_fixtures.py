"""Tiny LoRA adapters made by PEFT itself on the tiny random Llama (`models_fixtures`), and the
reference each one gives: transformers' greedy tokens on the model with PEFT's merge applied."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.engine.models_fixtures import build_model, hf_greedy

peft = pytest.importorskip("peft")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = [5, 17, 33, 9, 100, 42]
NUM_TOKENS = 12


@dataclass
class LoRAFixture:
    base: Path  # the base model's folder
    adapters: dict[str, Path]  # name -> PEFT adapter folder
    refs: dict[str | None, list[int]]  # adapter name (None: base) -> greedy tokens of PROMPT
    merged: dict[str | None, torch.nn.Module]  # the transformers models behind refs


def make_adapter(base_model, folder: Path, seed: int, r: int, targets=ALL, **config):
    """A PEFT LoRA adapter of base_model with random A and B (PEFT's init_lora_weights=False:
    a zero B would change nothing), saved to `folder`; returns the merged transformers model."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                          init_lora_weights=False, **config)  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base_model), cfg)
    model.save_pretrained(folder)
    return model.merge_and_unload()


def build_lora_fixture(root: Path) -> LoRAFixture:
    base = build_model("llama", root / "base")
    merged = {
        None: base,
        "all8": make_adapter(base, root / "all8", 1, 8),
        "qv4": make_adapter(
            base, root / "qv4", 2, 4, ("q_proj", "v_proj", "down_proj"), use_rslora=True
        ),  # fmt: skip
    }
    refs = {name: hf_greedy(m, PROMPT, NUM_TOKENS)[0] for name, m in merged.items()}
    assert len({tuple(t) for t in refs.values()}) == 3, "the adapters must change the tokens"
    return LoRAFixture(root / "base", {n: root / n for n in merged if n}, refs, merged)
