"""Decode graphs: bucket choice, padding rows, and replay equal to the eager forward.

On CPU the backend "captures" eagerly (allow_eager), which still exercises the static buffers,
bucket padding and the copy-in logic; on a GPU the same test captures real CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch
from models_fixtures import build_model

import hal
import platforms
from engine.graphs import (
    PER_GRAPH_BYTES,
    DecodeGraphs,
    MixedGraphs,
    default_sizes,
    graph_reasons,
)
from engine.loader import load_model
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq, SchedulerOutput
from engine.sequence import Request, Sequence

BLOCK = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_graphs")
    build_model("llama", folder)
    return folder


def _backend(device: str):
    caps = platforms.detect()
    if device == "cpu":
        return hal.load_backend(caps, device="cpu", configured="cpu")
    return hal.load_backend(caps, device=device)


def _seq(i: int, length: int, blocks: list[int], decode: bool, block: int = BLOCK) -> ScheduledSeq:
    """Sequence i with `length` tokens in KV; decode adds its last token, else prefills all."""
    tokens = [(7 * i + 3 * p) % 300 + 5 for p in range(length)]
    seq = Sequence(i, Request(f"r{i}", tokens, SamplingParams()), tokens)
    start = length - 1 if decode else 0
    pos = list(range(start, length))
    slots = [blocks[p // block] * block + p % block for p in pos]
    return ScheduledSeq(seq, len(pos), start, [tokens[p] for p in pos], blocks, slots, 1)


def _runner(
    tiny, device: str, sizes: tuple[int, ...], mixed: tuple[int, ...] = (), max_seqs: int = 8
) -> ModelRunner:
    backend = _backend(device)
    model, _, _ = load_model(str(tiny), backend, "float32", with_tokenizer=False)
    runner = ModelRunner(model, backend, BLOCK, model.dtype, graph_sizes=sizes, max_model_len=64,
                         mixed_graph_sizes=mixed, max_num_seqs=max_seqs)  # fmt: skip
    runner.allocate(64)
    return runner


def _capture(runner: ModelRunner, device: str) -> None:
    if device == "cpu":
        assert runner.capture_graphs(allow_eager=True) == 0
    else:
        if graph_reasons(runner.backend):
            pytest.skip(f"no capture here: {graph_reasons(runner.backend)}")
        assert runner.capture_graphs() > 0


def _prefill_then_decode(runner: ModelRunner, lengths: list[int], block: int = BLOCK):
    """Prefill each sequence to length-1 tokens, then one decode step of all; its logits."""
    tables, nxt = [], 1
    for n in lengths:
        k = -(-n // block)
        tables.append(list(range(nxt, nxt + k)))
        nxt += k
    pairs = list(zip(lengths, tables, strict=True))
    for i, (n, t) in enumerate(pairs):
        runner.execute(SchedulerOutput(scheduled=[_seq(i, n - 1, t, False, block)]))
    return runner.execute(
        SchedulerOutput(scheduled=[_seq(i, n, t, True, block) for i, (n, t) in enumerate(pairs)])
    )


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", [[5], [3, 9, 17], [12, 2, 7, 30, 6]])
def test_replay_equals_eager(tiny, device, lengths):
    eager = _runner(tiny, device, ())
    expect = _prefill_then_decode(eager, lengths)
    graphed = _runner(tiny, device, (1, 2, 4, 8))
    _capture(graphed, device)
    assert graphed.graphs is not None
    got = _prefill_then_decode(graphed, lengths)
    # Same kernels, same inputs; only the GEMMs see b padded rows instead of n, and BLAS picks its
    # blocking (so the fp32 summation order) by row count: fp32 rounding on CPU (logits are O(1),
    # eps 1.2e-7 times a few hundred terms), TF32's 10-bit mantissa on a GPU.
    tol = 1e-5 if device == "cpu" else 2e-2
    torch.testing.assert_close(got, expect, atol=tol, rtol=tol)


def test_context_classes_replay_equal_to_eager(tiny, monkeypatch):
    # A backend that names a context bound for small buckets: those are captured once more with
    # it as the max_seq_len hint, a step whose longest context is within it replays that capture,
    # a longer one the max_model_len capture; both equal the eager forward.
    def bounds(self, num_seqs, num_kv_heads, block_size, max_model_len):
        return (12, 99) if num_seqs <= 2 else ()

    monkeypatch.setattr(type(_backend("cpu")), "decode_context_bounds", bounds)
    graphed = _runner(tiny, "cpu", (1, 2, 4))
    assert graphed.graph_pool_estimate(0, 1)[0] == 5 * PER_GRAPH_BYTES  # 1 + 2 + 2 captures
    graphed.capture_graphs(allow_eager=True)
    graphs: DecodeGraphs = graphed.graphs
    assert graphs.hints == {1: (12, 64), 2: (12, 64), 4: (64,)}  # 99 >= max_model_len: dropped
    assert sorted(graphs.runners) == [(1, 12), (1, 64), (2, 12), (2, 64), (4, 64)]
    eager = _runner(tiny, "cpu", ())
    for lengths, key in (([5, 9], (2, 12)), ([5, 30], (2, 64)), ([12], (1, 12))):
        expect = _prefill_then_decode(eager, lengths)
        before = graphs.key_replays[key]
        got = _prefill_then_decode(graphed, lengths)
        assert graphs.key_replays[key] == before + 1, (lengths, graphs.key_replays)
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (real captures)")
def test_context_classes_on_a_gpu(tiny, monkeypatch):
    # Context classes on the CUDA backend (on unless HAL_DECODE_CONTEXT_CLASSES=0): small buckets
    # whose warp-specialized decode would split at max_model_len get a capture at the longest
    # unsplit context (the split threshold lowered to 4 pages so the tiny model's 256 positions
    # reach past it).
    from backends.triton import attention_ws

    monkeypatch.delenv("HAL_DECODE_CONTEXT_CLASSES", raising=False)
    monkeypatch.setattr(attention_ws, "SPLIT_MIN_PAGES", 4)
    backend = _backend("cuda")
    if graph_reasons(backend) or attention_ws.device_reason(backend.caps.cc_at_least(9, 0)):
        pytest.skip("needs CUDA graphs and the warp-specialized attention (sm_90+)")
    model, _, _ = load_model(str(tiny), backend, "float32", with_tokenizer=False)
    runner = ModelRunner(model, backend, 16, model.dtype, graph_sizes=(1, 2), max_model_len=256)
    runner.allocate(64)
    runner.capture_graphs()
    assert runner.graphs.hints == {1: (48, 256), 2: (48, 256)}
    eager = ModelRunner(model, backend, 16, model.dtype, max_model_len=256)
    eager.allocate(64)
    for lengths, key in (([20, 40], (2, 48)), ([20, 100], (2, 256))):
        expect = _prefill_then_decode(eager, lengths, block=16)
        got = _prefill_then_decode(runner, lengths, block=16)
        assert runner.graphs.key_replays[key] == 1
        torch.testing.assert_close(got, expect, atol=2e-2, rtol=2e-2)
    monkeypatch.setenv("HAL_DECODE_CONTEXT_CLASSES", "0")
    off = ModelRunner(model, backend, 16, model.dtype, graph_sizes=(1, 2), max_model_len=256)
    off.allocate(64)
    off.capture_graphs()
    assert off.graphs.hints == {1: (256,), 2: (256,)}


def test_bucket_choice_and_fallbacks(tiny):
    runner = _runner(tiny, "cpu", (1, 2, 4))
    runner.capture_graphs(allow_eager=True)
    graphs: DecodeGraphs = runner.graphs
    decode3 = runner.build_batch([_seq(i, 5, [1 + 2 * i, 2 + 2 * i], True) for i in range(3)])
    assert graphs.bucket(decode3) == 4
    decode5 = runner.build_batch([_seq(i, 5, [1 + 2 * i, 2 + 2 * i], True) for i in range(5)])
    assert graphs.bucket(decode5) is None  # larger than the largest bucket: eager
    prefill = runner.build_batch([_seq(0, 5, [1, 2], False)])
    assert graphs.bucket(prefill) is None  # a prefill step never replays


def test_graphs_off_reasons(tiny):
    runner = _runner(tiny, "cpu", (1, 2))
    assert runner.capture_graphs() == 0
    assert runner.graphs is None
    assert any("no graph capture" in r for r in runner.graph_skip_reasons)
    off = _runner(tiny, "cpu", ())
    off.capture_graphs()
    assert off.graphs is None and "graphs off" in off.graph_skip_reasons[0]


def test_default_sizes():
    assert default_sizes(256)[:5] == (1, 2, 4, 8, 16) and default_sizes(256)[-1] == 256
    assert default_sizes(3) == (1, 2, 3)
    assert default_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert default_sizes(2048)[-1] == 512


def test_bad_sizes(tiny):
    runner = _runner(tiny, "cpu", ())
    with pytest.raises(ValueError, match="graph sizes"):
        DecodeGraphs(runner.model, runner.backend, runner.kv_caches, (0, 2), 4, 16)


def test_pool_estimate_counts_each_capture():
    from engine.graphs import PER_GRAPH_BYTES, graph_pool_estimate

    one = graph_pool_estimate(100 << 20, 2048, 256, 1)
    assert graph_pool_estimate(100 << 20, 2048, 256, 35) == one + 34 * PER_GRAPH_BYTES
    assert one == 2 * (100 << 20) * 256 // 2048 + PER_GRAPH_BYTES


def test_sampled_rows_skips_the_gather_when_every_token_samples():
    from types import SimpleNamespace

    from engine.runner import sampled_rows

    hidden = torch.randn(4, 8)
    every = SimpleNamespace(logits_indices=torch.arange(4))
    assert sampled_rows(hidden, every) is hidden  # decode-only: all rows, no copy
    some = SimpleNamespace(logits_indices=torch.tensor([1, 3]))
    assert torch.equal(sampled_rows(hidden, some), hidden[[1, 3]])


def _mixed_steps(runner: ModelRunner, lengths: list[int]) -> list[torch.Tensor]:
    """Sequences 1.. prefill together (a step of many tokens), then sequence 0 prefills while
    they decode (prefill and decode rows in one step), then all decode; every step's logits."""
    tables, nxt = [], 1
    for n in lengths:
        k = -(-n // BLOCK)
        tables.append(list(range(nxt, nxt + k)))
        nxt += k
    seqs = list(zip(lengths, tables, strict=True))
    rest = [(i, n, t) for i, (n, t) in enumerate(seqs) if i > 0]

    def step(scheduled):
        return runner.execute(SchedulerOutput(scheduled=scheduled))

    return [
        step([_seq(i, n - 2, t, decode=False) for i, n, t in rest]),
        step([_seq(0, lengths[0] - 1, tables[0], False)]
             + [_seq(i, n - 1, t, decode=True) for i, n, t in rest]),
        step([_seq(i, n, t, decode=True) for i, (n, t) in enumerate(seqs)]),
    ]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", [[9, 5], [3, 9, 17, 6], [12, 3, 7, 30, 6]])
def test_mixed_steps_replay_equal_eager(tiny, device, lengths):
    eager = _runner(tiny, device, ())
    expect = _mixed_steps(eager, lengths)
    graphed = _runner(tiny, device, (1, 2, 4, 8), mixed=(16, 48, 64), max_seqs=6)
    _capture(graphed, device)
    assert graphed.mixed_graphs is not None
    got = _mixed_steps(graphed, lengths)
    assert graphed.mixed_graphs.replays == 2  # the two steps with prefill tokens
    assert graphed.graphs.replays == 1  # the decode step
    tol = 1e-5 if device == "cpu" else 2e-2  # as test_replay_equals_eager: padded GEMM rows
    for g, e in zip(got, expect, strict=True):
        torch.testing.assert_close(g, e, atol=tol, rtol=tol)


def test_mixed_bucket_choice_and_fallbacks(tiny):
    runner = _runner(tiny, "cpu", (1, 2), mixed=(8, 16), max_seqs=3)
    runner.capture_graphs(allow_eager=True)
    mixed: MixedGraphs = runner.mixed_graphs
    assert mixed.sizes == (8, 16) and mixed.max_seqs == 3
    two = runner.build_batch([_seq(0, 5, [1, 2], False), _seq(1, 4, [3], True)])  # 6 tokens
    assert mixed.bucket(two) == 8
    big = runner.build_batch([_seq(0, 17, [1, 2, 3, 4, 5], False)])
    assert mixed.bucket(big) is None  # more tokens than the largest bucket: eager
    many = runner.build_batch([_seq(i, 3, [1 + i], False) for i in range(4)])
    assert mixed.bucket(many) is None  # more sequences than a capture has slots
    decode = runner.build_batch([_seq(i, 5, [1 + 2 * i, 2 + 2 * i], True) for i in range(2)])
    assert runner.graphs.bucket(decode) == 2  # decode-only steps take the decode graphs first
    decode3 = runner.build_batch([_seq(i, 5, [1 + 2 * i, 2 + 2 * i], True) for i in range(3)])
    assert runner.graphs.bucket(decode3) is None and mixed.bucket(decode3) == 8


def test_mixed_graphs_need_decode_graphs_and_sizes(tiny):
    assert _runner(tiny, "cpu", (), mixed=(8,)).mixed_graph_sizes == ()  # enforce_eager wins
    with pytest.raises(ValueError, match="max_num_seqs"):
        _runner(tiny, "cpu", (1,), mixed=(8,), max_seqs=0)
    runner = _runner(tiny, "cpu", ())
    with pytest.raises(ValueError, match="mixed-step graph sizes"):
        MixedGraphs(runner.model, runner.backend, runner.kv_caches, (0,), 2, 4, 16)


def test_mixed_graph_sizes_config():
    from engine.config import SchedulerConfig
    from engine.engine_config import EngineConfig
    from engine.graphs import configured_mixed_sizes

    sched = SchedulerConfig(max_num_batched_tokens=512)
    cfg = EngineConfig(model="m", scheduler=sched, mixed_graph_sizes=(128, 512))
    assert configured_mixed_sizes(cfg) == (128, 512)
    # the defaults: powers of two from 128 up to the token budget, at most 8192
    assert configured_mixed_sizes(EngineConfig(model="m", scheduler=sched)) == (128, 256, 512)
    big = SchedulerConfig(max_num_batched_tokens=16384)
    assert configured_mixed_sizes(EngineConfig(model="m", scheduler=big)) == (
        128, 256, 512, 1024, 2048, 4096, 8192)  # fmt: skip
    odd = SchedulerConfig(max_num_batched_tokens=3000)
    assert configured_mixed_sizes(EngineConfig(model="m", scheduler=odd))[-2:] == (2048, 3000)
    none = EngineConfig(model="m", scheduler=sched, mixed_graph_sizes=())
    assert configured_mixed_sizes(none) == ()
    off = EngineConfig(model="m", scheduler=sched, mixed_graph_sizes=(128,), enforce_eager=True)
    assert configured_mixed_sizes(off) == ()
    with pytest.raises(ValueError, match="exceeds max_num_batched_tokens=512"):
        EngineConfig(model="m", scheduler=sched, mixed_graph_sizes=(1024,))
    with pytest.raises(ValueError, match="token counts >= 1"):
        EngineConfig(model="m", scheduler=sched, mixed_graph_sizes=(0,))
    for bad in ((0,), (), 8, (True,)):  # the decode buckets share the check
        with pytest.raises(ValueError, match="cuda_graph_sizes must be a non-empty list"):
            EngineConfig(model="m", cuda_graph_sizes=bad)


def test_llm_passes_mixed_graph_sizes_to_its_runner(tiny):
    from engine import LLM

    llm = LLM(model=str(tiny), dtype="float32", device="cpu", kv_cache_memory_bytes=4 << 20,
              max_num_batched_tokens=256, max_num_seqs=6, mixed_graph_sizes=[32, 16])  # fmt: skip
    runner = llm.engine.runner
    assert runner.mixed_graph_sizes == (32, 16) and runner.max_num_seqs == 6
    assert runner.mixed_graphs is None  # the CPU backend captures nothing


def test_mixed_steps_on_the_triton_kernels_under_the_interpreter(tiny):
    """The CUDA backend's kernels (general attention over padded token rows and empty sequence
    slots, the fused rotary + KV write skipping slot -1) on the CPU, graphs "captured" eagerly:
    replays equal that backend's eager steps and the CPU reference's."""
    import importlib
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (a GPU run covers this with real captures)")
    caps = importlib.import_module("backends.cuda").interpreter_capabilities()
    if caps is None:
        pytest.skip("triton is not installed")
    lengths = [12, 3, 7, 30, 6]

    def runner(sizes, mixed):
        backend = hal.load_backend(caps, device="cpu", configured="require:cuda")
        model, _, _ = load_model(str(tiny), backend, "float32", with_tokenizer=False)
        r = ModelRunner(model, backend, BLOCK, model.dtype, graph_sizes=sizes, max_model_len=64,
                        mixed_graph_sizes=mixed, max_num_seqs=6)  # fmt: skip
        r.allocate(64)
        return r

    eager = _mixed_steps(runner((), ()), lengths)
    graphed = runner((8,), (16, 48))
    graphed.capture_graphs(allow_eager=True)
    got = _mixed_steps(graphed, lengths)
    assert graphed.mixed_graphs.replays == 2 and graphed.graphs.replays == 1
    assert graphed.backend.ran.get("attention") == "triton"
    reference = _mixed_steps(_runner(tiny, "cpu", ()), lengths)
    for g, e, ref in zip(got, eager, reference, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)  # fp32, padded GEMM rows only
        torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4)  # another kernel's fp32 order


def test_a_packed_step_uploads_to_the_batch_build_batch_makes(tiny):
    # What the driver of a distributed engine sends (pack_step, pickled: bytes) gives a rank
    # the very batch the in-process runner builds, ragged block tables and prefill rows included.
    import pickle

    from engine.runner import pack_step

    runner = _runner(tiny, "cpu", ())
    scheduled = [_seq(0, 9, [1, 2, 3], False), _seq(1, 5, [4, 5], True), _seq(2, 3, [6], True),
                 _seq(3, 14, [7, 8, 9, 10], False)]  # fmt: skip
    sent = pickle.loads(pickle.dumps(pack_step(scheduled)))
    assert isinstance(sent.buffer, bytes)
    got, want = runner.upload(sent), runner.build_batch(scheduled)
    for name in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens",
                 "block_tables", "logits_indices"):  # fmt: skip
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    hints = (got.max_query_len, got.max_seq_len)
    assert hints == (want.max_query_len, want.max_seq_len) == (14, 14)
    with pytest.raises(ValueError, match="no scheduled sequences"):
        pack_step([])
