"""In-process checks: stage split, rank layout, pipeline stages chained by hand equal the whole
model, sharded loading reads about 1/TP of the weights, and bad layouts fail before any worker."""

from __future__ import annotations

import dataclasses
import sys
import time

import psutil
import pytest
import torch

from engine import LLM
from engine.distributed.collectives import WorldLayout, collective_backend
from engine.distributed.executor import check_parallel_config, connect_ray
from engine.engine_config import ParallelConfig
from engine.loader.hf import SafetensorsSource, read_hf_config
from engine.memory import weight_bytes
from engine.models.llama import LlamaForCausalLM
from engine.parallel import SINGLE, ParallelContext, stage_layers
from hal.select import load_backend
from tests.engine.models_fixtures import PagedSequence


@pytest.fixture(scope="module")
def backend(cpu_caps):
    return load_backend(cpu_caps, configured="cpu")


@pytest.mark.parametrize(
    "num_layers,pp,want",
    [(3, 2, [(0, 2), (2, 3)]), (4, 2, [(0, 2), (2, 4)]), (5, 3, [(0, 2), (2, 4), (4, 5)])],
)
def test_stage_layers_contiguous_and_balanced(num_layers, pp, want):
    assert [stage_layers(num_layers, p, pp) for p in range(pp)] == want
    with pytest.raises(ValueError, match="pipeline_parallel_size: 4 must lie in 1..3"):
        stage_layers(3, 0, 4)


def test_world_layout_ranks():
    layout = WorldLayout(tp_size=2, pp_size=2)
    assert [layout.coords(r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layout.tp_group_ranks(1) == [2, 3] and layout.output_rank == 2
    lines = layout.describe(3, "gloo")
    assert "tensor_parallel 2 x pipeline_parallel 2, collectives gloo" in lines[0]
    assert lines[1:] == [
        "  stage 0: layers 0..1 on ranks 0, 1",
        "  stage 1: layers 2..2 on ranks 2, 3",
    ]


def test_collective_backend_from_capabilities(cpu_caps):
    assert collective_backend(cpu_caps) == "gloo"
    for vendor in ("nvidia", "amd"):  # torch calls RCCL "nccl" on ROCm
        gpu = dataclasses.replace(cpu_caps, vendor=vendor)
        assert collective_backend(gpu) == collective_backend(gpu, "cuda:1") == "nccl"
        # ranks told to run on the CPU of a GPU host talk over gloo (NCCL needs a GPU each)
        assert collective_backend(gpu, "cpu") == "gloo"


def test_pipeline_stages_chained_equal_whole_model(dist_model, backend):
    """Stage 0 (layers 0-1, embedding) hands (hidden, residual) to stage 1 (layer 2, tied head)."""
    config = read_hf_config(dist_model)
    source = SafetensorsSource(dist_model)
    whole = LlamaForCausalLM(config, backend)
    whole.load_weights(source)
    stages = []
    for p in range(2):
        m = LlamaForCausalLM(config, backend, parallel=ParallelContext(pp_rank=p, pp_size=2))
        m.load_weights(source)
        stages.append(m)
    assert [len(s.layers) for s in stages] == [2, 1]
    assert stages[0].lm_head is None and stages[1].embed_tokens is None
    ref, seqs = PagedSequence(whole, seed=1), [PagedSequence(s, seed=1) for s in stages]
    for seq, stage in zip(seqs, stages, strict=True):  # a stage caches only its own layers
        seq.kv_caches = seq.kv_caches[: len(stage.layers)]
    for tokens in ([5, 9, 33, 7, 100, 2, 8], [41], [3]):
        want = ref.step(tokens)
        batch = seqs[0].batch(tokens)
        hidden, residual = stages[0](batch, seqs[0].kv_caches)
        out = stages[1](batch, seqs[1].kv_caches, (hidden, residual))
        got = stages[1].compute_logits(out[batch.logits_indices])
        for s in seqs:
            s.length += len(tokens)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="intermediate"):
        stages[1](batch, seqs[1].kv_caches)


class CountingSource:
    """A TensorSource wrapper recording the bytes of every read (the loader's transient peak)."""

    def __init__(self, inner) -> None:
        self.inner, self.read_bytes, self.largest_read = inner, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read(self, name, dim=None, start=0, stop=None):
        t = self.inner.read(name, dim, start, stop)
        nbytes = t.numel() * t.element_size()
        self.read_bytes += nbytes
        self.largest_read = max(self.largest_read, nbytes)
        return t


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_loading_reads_about_one_over_tp(tp, tmp_path, backend):
    """A rank's weights, and all it reads to build them, are ~1/TP of the whole (norms, biases
    of row-parallel layers and replicated KV heads are the only extra)."""
    from tests.distributed.conftest import build_dist_model

    build_dist_model(tmp_path, hidden_size=128, intermediate_size=512, num_key_value_heads=2)
    config = read_hf_config(tmp_path)
    full_src = CountingSource(SafetensorsSource(tmp_path))
    full = LlamaForCausalLM(config, backend, parallel=SINGLE)
    full.load_weights(full_src)
    total = weight_bytes(full) - sum(b.numel() * b.element_size() for b in full.buffers())

    class Nothing:  # collectives are never called while loading
        pass

    for rank in range(tp):
        src = CountingSource(SafetensorsSource(tmp_path))
        m = LlamaForCausalLM(config, backend, parallel=ParallelContext(rank, tp, Nothing()))
        m.load_weights(src)
        held = weight_bytes(m) - sum(b.numel() * b.element_size() for b in m.buffers())
        assert held < total / tp * 1.15, (rank, held, total)
        assert src.read_bytes <= held * 1.01  # read only this rank's slices, nothing whole
        assert held + src.largest_read < total / tp * 1.3  # peak while loading


def test_parallel_config_validates():
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1, got 0"):
        ParallelConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of mp, ray"):
        ParallelConfig(distributed_executor_backend="mpi")
    with pytest.raises(ValueError, match="step_timeout_s"):
        ParallelConfig(step_timeout_s=0)
    assert ParallelConfig().executor_backend == "uni"
    assert ParallelConfig(tensor_parallel_size=2).executor_backend == "mp"


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(tensor_parallel_size=3), r"tensor_parallel_size=3 does not divide "
         r"num_attention_heads=4 .*; use one of 1, 2, 4"),
        (dict(pipeline_parallel_size=4), r"pipeline_parallel_size=4 exceeds the 3 layers .*; "
         r"use at most 3"),
    ],
)  # fmt: skip
def test_bad_layout_fails_before_any_worker(kw, match, dist_model):
    before = len(psutil.Process().children(recursive=True))
    start = time.monotonic()
    with pytest.raises(ValueError, match=match):
        LLM(model=dist_model, dtype="float32", device="cpu", **kw)
    assert time.monotonic() - start < 10
    assert len(psutil.Process().children(recursive=True)) == before


def test_more_ranks_than_gpus_with_mp(cpu_caps, dist_model):
    gpu = dataclasses.replace(cpu_caps, vendor="nvidia", device_count=2)
    config = read_hf_config(dist_model)
    par = ParallelConfig(tensor_parallel_size=4)
    with pytest.raises(ValueError, match=r"4 ranks, but this host has 2 GPU.*'ray'"):
        check_parallel_config(par, config, gpu, "m")
    check_parallel_config(
        dataclasses.replace(par, distributed_executor_backend="ray"), config, gpu, "m"
    )
    # device="cpu" runs CPU ranks on a GPU host (the thirty-third session found it refused)
    check_parallel_config(par, config, gpu, "m", device="cpu")


def test_ray_missing_or_unreachable(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ValueError, match="Ray is not installed; pip install"):
        connect_ray(None)


def test_ray_no_cluster_reachable():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray session is already connected in this process")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"no Ray cluster reachable at ray_address='127.0.0.1:1'"):
        connect_ray("127.0.0.1:1")
    assert time.monotonic() - start < 10


def test_a_step_is_pickled_once_for_every_rank(monkeypatch):
    # The driver pickles a step's StepInput once (PickledOnce); each rank's send copies those
    # bytes without pickling the step again, and the rank unpickles the StepInput itself.
    import pickle
    from array import array
    from types import SimpleNamespace

    from engine.distributed import executor as ex
    from engine.distributed.worker import StepInput
    from engine.runner import pack_step

    seqs = [SimpleNamespace(num_new_tokens=1, start_pos=i + 9, num_samples=1, token_ids=[5],
                            block_ids=array("i", range(i + 1)), slot_mapping=[(i + 9) % 16],
                            draft=())
            for i in range(64)]  # fmt: skip
    step = StepInput(pack_step(seqs), blocks_to_copy=[(1, 2)], hold=True, feed_rows=[0, 3])
    pickled = []
    reduce_ex = StepInput.__reduce_ex__

    def counted(self, proto):
        pickled.append(1)
        return reduce_ex(self, proto)

    monkeypatch.setattr(StepInput, "__reduce_ex__", counted)
    once = ex.PickledOnce(step)
    assert len(pickled) == 1
    sends = [pickle.dumps(("execute", (once,))) for _ in range(4)]  # four ranks' messages
    assert len(pickled) == 1  # the sends copied the bytes
    for data in sends:
        method, (got,) = pickle.loads(data)
        assert method == "execute" and isinstance(got, StepInput)
        assert (got.blocks_to_copy, got.hold, got.feed_rows) == ([(1, 2)], True, [0, 3])
        # the packed batch travels as its bytes, the layout as its sizes
        assert got.batch.buffer == step.batch.buffer.numpy().tobytes()
        assert got.batch.layout.sizes == step.batch.layout.sizes == (64, 64, 64, 64)
        assert (got.batch.max_query_len, got.batch.max_seq_len) == (1, 73)


def test_the_memory_profile_step_packs():
    """The workers' memory-profile forward (GPU only) packs one prompt over blocks 1..: its
    stand-in for a ScheduledSeq carries every field pack_step reads (session 32's `draft` was
    missing, which only a GPU worker's start showed)."""
    from engine.distributed.worker import profile_step

    step = profile_step(40, 16)
    assert (step.max_query_len, step.max_seq_len) == (40, 40)
    batch = step.layout.batch(step.buffer, step.max_query_len, step.max_seq_len)
    assert batch.slot_mapping.tolist() == [16 + p for p in range(40)]
    assert batch.block_tables.tolist() == [[1, 2, 3]]
    assert batch.logits_indices.tolist() == [39]
