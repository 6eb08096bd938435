"""The engine end to end on the ROCm backend under the Triton interpreter (MI300X profile): a tiny
Llama gives the same greedy tokens as the CPU reference backend."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "interpreter capabilities build a CPU backend; this run is native", allow_module_level=True
    )

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "engine"))  # models_fixtures

from models_fixtures import build_model  # noqa: E402

import hal  # noqa: E402
import platforms  # noqa: E402
from backends import rocm as rocm_pkg  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 77, 301, 12, 9, 44, 120], [17, 3, 250], [99] * 20]


def test_tiny_model_greedy_tokens_match_cpu_reference(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "tiny_llama"
    build_model("llama", folder)
    cpu = LLM(model=str(folder), dtype="float32", device="cpu", kv_cache_memory_bytes=4 << 20)
    expected = [o.outputs[0].token_ids for o in cpu.generate(prompt_token_ids=PROMPTS,
                                                             sampling_params=GREEDY)]  # fmt: skip
    # The engine detects this machine (a CPU); it is shown the MI300X-under-the-interpreter device
    # instead, whose backend runs on CPU tensors (the engine has no device hook for that yet).
    caps = rocm_pkg.interpreter_capabilities()
    monkeypatch.setattr(platforms, "detect", lambda: caps)
    real_load = hal.load_backend
    monkeypatch.setattr(hal, "load_backend", lambda c, device=None, **kw: real_load(c, "cpu", **kw))
    llm = LLM(model=str(folder), dtype="float32", backend="rocm", kv_cache_memory_bytes=4 << 20)
    backend = llm.engine.backend
    assert backend.name == "rocm"
    got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS,
                                                        sampling_params=GREEDY)]  # fmt: skip
    assert got == expected
    for family in ("attention", "rms_norm", "rotary", "activation", "kv_write"):
        assert backend.ran.get(family) == "triton", backend.ran
