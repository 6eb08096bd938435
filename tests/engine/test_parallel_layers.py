"""Tensor-parallel shard math, checked in one process without torch.distributed.

Layer level: each rank's layer loads its slices; concatenating (column-parallel) or summing
(row-parallel, the all-reduce) the ranks' outputs must give the unsharded layer's output.
Model level: ranks run in threads that exchange tensors through a barrier (a real all-reduce and
gather), and the tp=2 / tp=4 model must compute the tp=1 logits.
"""

from __future__ import annotations

import threading

import pytest
import torch
from models_fixtures import VOCAB, PagedSequence, build_model, write_gguf

from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from engine.loader import load_model
from engine.parallel import SINGLE, ParallelContext, WeightLoadError
from hal.select import load_backend


class DictSource:
    """A TensorSource over an in-memory state dict."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def has(self, name):
        return name in self.tensors

    def shape(self, name):
        if name not in self.tensors:
            raise WeightLoadError(f"memory: tensor {name!r} is missing")
        return tuple(self.tensors[name].shape)

    def read(self, name, dim=None, start=0, stop=None):
        t = self.tensors[name]
        return t if dim is None else t.narrow(dim, start, (stop or t.shape[dim]) - start)

    def location(self, name):
        return "memory"


class PartialCollectives:
    """Collectives that return this rank's part unchanged; the test combines the parts itself."""

    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim):
        return x

    def gather(self, x, dim, dst):
        return x


class ThreadGroup:
    """tp_size ranks as threads; collectives exchange tensors through a shared list + barrier."""

    def __init__(self, size: int, fused_norm=None) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots: list[torch.Tensor | None] = [None] * size
        self.fused_norm = fused_norm  # a backend: collectives with all_reduce_rms_norm
        self.fused_calls = [0] * size

    def context(self, rank: int) -> ParallelContext:
        kind = _FusedRankCollectives if self.fused_norm is not None else _RankCollectives
        return ParallelContext(rank, self.size, kind(self, rank))

    def exchange(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = x
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return parts

    def run(self, fn) -> list:
        """fn(rank, parallel) on every rank concurrently; returns the results in rank order."""
        results, errors = [None] * self.size, []

        def target(rank):
            try:
                results[rank] = fn(rank, self.context(rank))
            except BaseException as e:  # surface the first failure instead of a barrier hang
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class _RankCollectives:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank = group, rank

    def all_reduce(self, x):
        parts = self.group.exchange(self.rank, x)
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def all_gather(self, x, dim):
        return torch.cat(self.group.exchange(self.rank, x), dim)

    def gather(self, x, dim, dst):
        parts = self.group.exchange(self.rank, x)
        return torch.cat(parts, dim) if self.rank == dst else None


class _FusedRankCollectives(_RankCollectives):
    """Collectives with the fused all-reduce + residual add + RMSNorm the one-shot kernel gives
    on GPUs (here: the sum, then the backend's norm), counting its calls."""

    def all_reduce_rms_norm(self, x, residual, weight, eps, fp8_dtype=None):
        if fp8_dtype is not None:
            return None
        self.group.fused_calls[self.rank] += 1
        return self.group.fused_norm.rms_norm(self.all_reduce(x), weight, eps, residual)


@pytest.fixture(scope="module")
def backend(cpu_caps):
    return load_backend(cpu_caps, configured="cpu")


def _ranks(tp: int) -> list[ParallelContext]:
    if tp == 1:
        return [SINGLE]
    return [ParallelContext(r, tp, PartialCollectives()) for r in range(tp)]


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_column_parallel_concatenates(backend):
    src = DictSource({"p.weight": _random(12, 8), "p.bias": _random(12, seed=1)})
    x = _random(5, 8, seed=2)
    layers = []
    for ctx in _ranks(1) + _ranks(2):
        layer = ColumnParallelLinear(8, 12, backend, ctx, torch.float32, bias=True)
        layer.load(src, "p")
        layers.append(layer)
    full, r0, r1 = (layer(x) for layer in layers)
    assert r0.shape == (5, 6)
    torch.testing.assert_close(torch.cat([r0, r1], -1), full)


def test_merged_gate_up_pairs_halves_per_rank(backend):
    src = DictSource({"g.weight": _random(16, 8), "u.weight": _random(16, 8, seed=1)})
    x = _random(3, 8, seed=2)
    outs = []
    for ctx in _ranks(1) + _ranks(2):
        layer = MergedColumnParallelLinear(8, [16, 16], backend, ctx, torch.float32)
        layer.load(src, ["g", "u"])
        outs.append(backend.silu_and_mul(layer(x)))
        # The MLP's call: gate_up and the activation as one backend op (the same values)
        assert torch.equal(layer.forward_silu_and_mul(x), outs[-1])
    torch.testing.assert_close(torch.cat(outs[1:], -1), outs[0])
    gate, up = src.tensors["g.weight"], src.tensors["u.weight"]
    torch.testing.assert_close(outs[0], torch.nn.functional.silu(x @ gate.T) * (x @ up.T))
    odd = MergedColumnParallelLinear(8, [16, 8], backend, SINGLE, torch.float32)
    with pytest.raises(ValueError, match=r"output_sizes: \[16, 8\]; silu_and_mul wants"):
        odd.forward_silu_and_mul(x)


def test_row_parallel_partial_sums_add_up(backend):
    src = DictSource({"o.weight": _random(6, 12)})
    x = _random(4, 12, seed=1)
    full = RowParallelLinear(12, 6, backend, SINGLE, torch.float32)
    full.load(src, "o")
    parts = []
    for ctx in _ranks(2):
        layer = RowParallelLinear(12, 6, backend, ctx, torch.float32)
        layer.load(src, "o")
        parts.append(layer(x[:, layer.col_start : layer.col_stop]))  # all-reduce is the sum
    torch.testing.assert_close(parts[0] + parts[1], full(x))


class _PushCollectives(PartialCollectives):
    """Collectives that offer a GEMM push target (as the one-shot all-reduce does in graph
    capture) and record what they were told."""

    def __init__(self, offer: bool) -> None:
        self.offer, self.asked, self.marked = offer, [], []

    def ll_push(self, rows, cols, dtype):
        self.asked.append((rows, cols, dtype))
        return type("Target", (), {"done": False})() if self.offer else None

    def mark_pushed(self, y):
        self.marked.append(y)


class _PushBackend:
    """The CPU backend plus a `linear_push` that says it pushed (or not), as the CUDA one does."""

    def __init__(self, inner, pushes: bool) -> None:
        self.inner, self.pushes, self.calls = inner, pushes, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def linear_push(self, x, weight, target):
        self.calls += 1
        target.done = self.pushes
        return self.inner.linear(x, weight)


@pytest.mark.parametrize(("offer", "pushes"), [(True, True), (True, False), (False, False)])
def test_row_parallel_partial_goes_to_the_push_target(offer, pushes, backend):
    # reduce_results=False (the norm reduces): the layer asks the collectives for a target for
    # its [T, out] partial, runs the backend's pushing GEMM and marks its output when the launch
    # pushed; the values are the plain partial sum either way.
    src = DictSource({"o.weight": _random(6, 12)})
    x = _random(3, 4, 12, seed=1)
    coll = _PushCollectives(offer)
    pb = _PushBackend(backend, pushes)
    layer = RowParallelLinear(12, 6, pb, ParallelContext(0, 2, coll), torch.float32)
    layer.load(src, "o")
    plain = backend.linear(x[..., :6], layer.weight)
    assert torch.equal(layer(x[..., :6]), plain)  # reduce_results: no target asked for
    assert coll.asked == [] and pb.calls == 0
    layer.reduce_results = False
    y = layer(x[..., :6])
    assert torch.equal(y, plain) and y.shape == (3, 4, 6)
    assert coll.asked == [(12, 6, torch.float32)] and pb.calls == (1 if offer else 0)
    assert [m is y for m in coll.marked] == ([True] if pushes else [])


@pytest.mark.parametrize("tp", [2, 4])
def test_qkv_split_by_heads_with_kv_replication(tp, backend):
    """4 query heads, 2 KV heads, head_dim 4: tp 2 splits both; tp 4 replicates each KV head."""
    h, d, heads, kv_heads = 8, 4, 4, 2
    names = {f"{n}.weight": _random(rows * d, h, seed=i) for i, (n, rows) in
             enumerate((("q", heads), ("k", kv_heads), ("v", kv_heads)))}  # fmt: skip
    names.update({f"{n}.bias": _random(rows * d, seed=9 + i) for i, (n, rows) in
                  enumerate((("q", heads), ("k", kv_heads), ("v", kv_heads)))})  # fmt: skip
    src = DictSource(names)
    x = _random(3, h, seed=5)
    full = QKVParallelLinear(h, d, heads, kv_heads, backend, SINGLE, torch.float32, bias=True)
    full.load(src, "q", "k", "v")
    fq, fk, fv = full.split(full(x))
    qs = []
    for ctx in _ranks(tp):
        layer = QKVParallelLinear(h, d, heads, kv_heads, backend, ctx, torch.float32, bias=True)
        layer.load(src, "q", "k", "v")
        q, k, v = layer.split(layer(x))
        qs.append(q)
        assert layer.num_kv_heads == max(1, kv_heads // tp)
        # the rank's query heads read KV head (global query head) // (heads / kv_heads)
        first_q_head = ctx.tp_rank * (heads // tp)
        kv_head = first_q_head // (heads // kv_heads)
        torch.testing.assert_close(k[:, 0], fk[:, kv_head])
        torch.testing.assert_close(v[:, 0], fv[:, kv_head])
    torch.testing.assert_close(torch.cat(qs, 1), fq)


@pytest.mark.parametrize("vocab,tp", [(12, 2), (10, 4)])
def test_vocab_parallel_embedding_and_lm_head(vocab, tp, backend):
    """Each rank embeds only its ids (the sum restores all); the LM head's slices concatenate.
    vocab 10 over 4 ranks pads to 12 (3 rows each; the last rank holds one real row)."""
    src = DictSource({"e": _random(vocab, 6)})
    ids = torch.tensor([0, 9, 3, vocab - 1, 5, 1])
    hidden = _random(4, 6, seed=1)
    emb = VocabParallelEmbedding(vocab, 6, backend, SINGLE, torch.float32)
    emb.load(src, "e")
    head = ParallelLMHead(vocab, 6, backend, SINGLE, torch.float32)
    head.tie(emb)
    emb_parts, logit_parts = [], []
    for ctx in _ranks(tp):
        e = VocabParallelEmbedding(vocab, 6, backend, ctx, torch.float32)
        e.load(src, "e")
        emb_parts.append(e(ids))
        lm = ParallelLMHead(vocab, 6, backend, ctx, torch.float32)
        lm.load(src, "e")
        logit_parts.append(lm.backend.linear(hidden, lm.weight))  # what each rank gathers
    torch.testing.assert_close(sum(emb_parts), emb(ids))
    torch.testing.assert_close(torch.cat(logit_parts, -1)[:, :vocab], head(hidden))
    assert head(hidden).dtype == torch.float32


@pytest.mark.parametrize("vocab,tp", [(12, 1), (12, 2), (10, 4)])
def test_lm_head_greedy_is_the_argmax_of_the_gathered_logits(vocab, tp, backend):
    """Each rank's argmax and one exchange of (value, id) pairs give torch.argmax over the whole
    vocab: ties across ranks go to the lowest id, NaN wins, vocab padding never does."""
    weight = _random(vocab, 6)
    weight[0] = weight[vocab - 1] = 3.0  # row 2 (all ones) ties at 18 on the first and last id
    hidden = _random(5, 6, seed=2)
    hidden[2] = 1.0
    src = DictSource({"e": weight})

    def run(rank, ctx):
        lm = ParallelLMHead(vocab, 6, backend, ctx, torch.float32)
        lm.load(src, "e")
        return lm.greedy(hidden)

    want = (hidden @ weight.T).argmax(dim=-1)
    assert int(want[2]) == 0
    for got in ThreadGroup(tp).run(run):
        assert torch.equal(got, want)
    weight[vocab // 2 + 1] = float("nan")  # NaN logits for one id, a later rank's at tp > 1
    want = (hidden @ weight.T).argmax(dim=-1)
    assert want.tolist() == [vocab // 2 + 1] * 5  # NaN counts as the maximum
    for got in ThreadGroup(tp).run(run):
        assert torch.equal(got, want)


def test_parallel_context_validates():
    with pytest.raises(ValueError, match="tp_rank"):
        ParallelContext(2, 2, PartialCollectives())
    with pytest.raises(ValueError, match="collectives"):
        ParallelContext(0, 2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ParallelContext(0, 4, PartialCollectives()).kv_head_range(6)
    with pytest.raises(ValueError, match="not divisible"):
        ParallelContext(0, 3, PartialCollectives()).shard(8)
    x = torch.ones(2)
    assert SINGLE.all_reduce(x) is x and SINGLE.gather(x) is x  # tp 1: no copies, no calls


@pytest.mark.parametrize(
    "variant,tp,fmt",
    [("llama_bias", 2, "hf"), ("llama_bias", 4, "hf"), ("qwen2", 2, "hf"), ("llama", 2, "gguf")],
)
def test_tensor_parallel_model_matches_single_rank(variant, tp, fmt, backend, tmp_path):
    """Sharded loading + collectives: ranks in threads compute the tp=1 logits on the driver.
    tp 4 > 2 KV heads replicates them; the GGUF case reads row and column slices of a GGUF."""
    hf = build_model(variant, tmp_path)
    path = write_gguf(hf, tmp_path / "model.gguf") if fmt == "gguf" else tmp_path
    prompt = torch.randint(3, VOCAB, (18,), generator=torch.Generator().manual_seed(0)).tolist()
    steps = [prompt, [5], [7]]

    def run(rank, parallel):
        model, _, _ = load_model(path, backend, "float32", parallel, with_tokenizer=False)
        seq = PagedSequence(model, seed=3)
        return model.num_kv_heads, [seq.step(tokens) for tokens in steps]

    _, ref = run(0, SINGLE)
    results = ThreadGroup(tp).run(run)
    assert results[0][0] == max(1, 2 // tp)  # KV heads per rank (2 in total)
    for want, got in zip(ref, results[0][1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(logits is None for _, outs in results[1:] for logits in outs)


@pytest.mark.parametrize("fused", [False, True])
def test_layers_hand_partial_sums_to_the_next_norm(fused, backend, tmp_path):
    """At tp > 1 a bias-free layer's o_proj and down_proj return partial sums and the norms
    reduce them: through the collectives' fused all-reduce + RMSNorm when they have one (two per
    layer and the final norm, per forward), else all_reduce then the norm; same logits."""
    build_model("llama", tmp_path)
    prompt = torch.randint(3, VOCAB, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    steps = [prompt, [4]]

    def run(rank, parallel):
        model, _, _ = load_model(tmp_path, backend, "float32", parallel, with_tokenizer=False)
        assert all(layer.partial_out for layer in model.layers) == (parallel.tp_size > 1)
        seq = PagedSequence(model, seed=3)
        return len(model.layers), [seq.step(tokens) for tokens in steps]

    _, ref = run(0, SINGLE)
    group = ThreadGroup(2, backend if fused else None)
    results = group.run(run)
    for want, got in zip(ref, results[0][1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    layers = results[0][0]
    assert group.fused_calls == ([2 * layers * len(steps)] * 2 if fused else [0, 0])
