"""The output rank samples and returns only the SamplerOutput: seeded random sampling (temperature,
top-p/top-k/min-p, penalties, min_tokens, logprobs, n > 1 forks, structured outputs) at TP=2 and
PP=2 gives the in-process engine's tokens and logprobs, an abort while a batch is in flight loses
nothing and leaks no block, and what comes back per step is a few bytes per row, not a vocab-sized
array.
"""

from __future__ import annotations

import pickle
import random
import re

import pytest
import torch

from engine import SamplingParams
from engine.config import CacheConfig, SchedulerConfig
from engine.distributed.worker import StepSampling
from engine.engine_config import EngineConfig, ParallelConfig
from engine.llm_engine import LLMEngine
from engine.sampler import Sampler, SamplerOutput, SamplingRow, ScoredStep

# float32 partial sums in another order (see test_equivalence): logprobs O(1-10) agree to ~1e-6.
LOGPROB_ATOL = 1e-4
STOP_IDS = list(range(100, 384))  # most of the vocab: a row under min_tokens must avoid them

# request name -> params; every random one is seeded except "unseeded" (its stream differs from
# world size 1 by design: only its length is checked).
PARAMS = {
    "top_p": SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=8, ignore_eos=True,
                            logprobs=3, prompt_logprobs=2),
    "top_k_min_p": SamplingParams(temperature=1.2, top_k=20, min_p=0.05, seed=12, max_tokens=8,
                                  ignore_eos=True),
    "penalties": SamplingParams(temperature=0.3, repetition_penalty=1.3, presence_penalty=1.5,
                                frequency_penalty=2.0, seed=13, max_tokens=12, ignore_eos=True,
                                logprobs=0),
    "min_tokens": SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=STOP_IDS, seed=14,
                                 max_tokens=12),
    "fork": SamplingParams(n=2, temperature=0.9, top_k=50, seed=15, max_tokens=6, ignore_eos=True,
                           logprobs=2),
    "greedy": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1,
                             prompt_logprobs=0),
    "unseeded": SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True),
    # greedy but edited: not the plain-greedy (sharded argmax) path
    "edited": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                             logit_bias={11: 3.0, 12: -2.0}, allowed_token_ids=list(range(3, 90))),
    # structured outputs: the driver's bitmask rows, applied on the output rank
    "regex": SamplingParams(temperature=0.9, seed=16, max_tokens=12,
                            structured_outputs={"regex": r"[a-f]{2,5}-\d{1,3}"}),
    "choice_fork": SamplingParams(n=2, temperature=1.0, seed=17, max_tokens=12,
                                  structured_outputs={"choice": ["north", "south", "east"]}),
    # bad words: token ids from the driver's tokenizer, histories shipped for the longer word
    "bad_words": SamplingParams(temperature=0.9, seed=18, max_tokens=10, ignore_eos=True,
                                bad_words=["e", "ab c"]),
}  # fmt: skip


def _prompts() -> dict[str, list[int]]:
    rng = random.Random(3)
    # 40: chunked prefill
    lengths = dict(zip(PARAMS, (40, 5, 17, 9, 12, 7, 6, 8, 10, 11, 13), strict=True))
    prompts = {name: [rng.randrange(3, 384) for _ in range(n)] for name, n in lengths.items()}
    # A third of the vocab: the repetition penalty over the prompt changes which tokens win.
    prompts["penalties"] = list(range(3, 384, 3))
    return prompts


def _engine(
    model: str,
    tp: int = 1,
    pp: int = 1,
    async_scheduling: bool | None = None,
    max_num_seqs=256,
    speculative_config=None,
) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=model,
            dtype="float32",
            device="cpu",
            seed=7,
            async_scheduling=async_scheduling,
            speculative_config=speculative_config,
            cache=CacheConfig(kv_cache_memory_bytes=2 << 20),
            scheduler=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=max_num_seqs),
            parallel=ParallelConfig(
                tensor_parallel_size=tp, pipeline_parallel_size=pp, init_timeout_s=60.0
            ),
        )
    )


def _run(engine: LLMEngine, abort_in_flight: bool = False) -> tuple[dict, str]:
    """Generate every request; optionally abort, once, the first sampling sequence of a batch in
    flight that samples for another sequence too. Returns {name: RequestOutput}, aborted name."""
    prompts = _prompts()
    for name, params in PARAMS.items():
        engine.add_request(None, params, prompt_token_ids=prompts[name], request_id=name)
    done: dict = {}
    aborted = ""
    for _ in range(500):  # a livelocked engine fails here instead of hanging
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if abort_in_flight and not aborted:
            for flying, *_ in engine._in_flight:
                sampling = [ss for ss in flying.scheduled if ss.num_samples]
                if len(sampling) >= 2 and sampling[0].seq.request.request_id != "unseeded":
                    seq = sampling[0].seq
                    aborted = seq.request.request_id
                    assert engine.abort_request(aborted)
                    assert seq.seq_id in engine.scheduler.kv.block_tables  # held until it returns
                    break
    assert sorted(done) == sorted(PARAMS)
    assert not abort_in_flight or aborted
    return done, aborted


def _assert_same(want, got, name: str) -> None:
    """Same tokens and finish reasons; logprobs (chosen and top-k alternatives) within ATOL, of
    the outputs and of the prompt."""
    assert len(got.outputs) == len(want.outputs), name
    assert (want.prompt_logprobs is None) == (got.prompt_logprobs is None), name
    if want.prompt_logprobs is not None:
        assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == len(want.prompt_token_ids)
        assert want.prompt_logprobs[0] is None and got.prompt_logprobs[0] is None
        pairs = zip(want.prompt_logprobs[1:], got.prompt_logprobs[1:], strict=True)
        for pos, (la, lb) in enumerate(pairs):
            assert la.keys() == lb.keys(), (name, "prompt", pos)
            for token, value in la.items():
                assert abs(lb[token] - value) < LOGPROB_ATOL, (name, "prompt", pos, token)
    for a, b in zip(want.outputs, got.outputs, strict=True):
        where = f"{name}[{a.index}]"
        assert b.token_ids == a.token_ids, where
        assert b.finish_reason == a.finish_reason, where
        assert (a.logprobs is None) == (b.logprobs is None), where
        if a.logprobs is None:
            continue
        assert len(b.logprobs) == len(a.logprobs) == len(a.token_ids), where
        for step, (la, lb) in enumerate(zip(a.logprobs, b.logprobs, strict=True)):
            assert la.keys() == lb.keys(), (where, step)
            for token, value in la.items():
                assert abs(lb[token] - value) < LOGPROB_ATOL, (where, step, token)
        assert abs(b.cumulative_logprob - a.cumulative_logprob) < 10 * LOGPROB_ATOL, where


@pytest.fixture(scope="module")
def reference(dist_model):
    engine = _engine(dist_model)
    try:
        assert engine.runner is not None and not engine.executor.samples_remotely
        done, _ = _run(engine)
    finally:
        engine.shutdown()
    # The parameters did something: min_tokens held off the stop ids, then one stopped it; the
    # fork gave two different samples.
    stopped = done["min_tokens"].outputs[0]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) > 4
    assert all(t not in STOP_IDS for t in stopped.token_ids[:4])
    assert stopped.token_ids[-1] in STOP_IDS
    fork = done["fork"].outputs
    assert len(fork) == 2 and fork[0].token_ids != fork[1].token_ids
    assert re.fullmatch(r"[a-f]{2,5}-\d{1,3}", done["regex"].outputs[0].text)
    assert all(c.text in ("north", "south", "east") for c in done["choice_fork"].outputs)
    return done


def _spy(executor) -> list[tuple[list, list]]:
    """Record (per-rank args, per-rank results) of every step crossing the executor's pipes."""
    calls: list[tuple[list, list]] = []
    sent: list[list] = []
    submit_all, wait_all = executor._submit_all, executor._wait_all

    def spy_submit(method, args, what):
        if method == "execute":
            sent.append(list(args))
        return submit_all(method, args, what)

    def spy_wait(receipt, timeout_s, what):
        results = wait_all(receipt, timeout_s, what)
        if what.startswith("step "):
            calls.append((sent.pop(0), results))
        return results

    executor._submit_all, executor._wait_all = spy_submit, spy_wait
    return calls


def test_tp2_seeded_sampling_matches_in_process_and_ships_only_tokens(reference, dist_model):
    engine = _engine(dist_model, tp=2)
    try:
        executor = engine.executor
        assert executor.kind == "mp" and executor.samples_remotely
        calls = _spy(executor)
        done, _ = _run(engine)
        assert executor.failure is None and executor.num_in_flight == 0
    finally:
        engine.shutdown()
    for name in PARAMS:
        if name == "unseeded":  # the worker's shared generator: another stream, same length
            assert len(done[name].outputs[0].token_ids) == PARAMS[name].max_tokens
        else:
            _assert_same(reference[name], done[name], name)
    assert engine.kv_stats().num_used_blocks == 0 and not engine.requests

    out_rank = executor.layout.output_rank
    vocab = engine.model_config.vocab_size
    sampled_steps = 0
    for args, results in calls:
        assert all(len(a) == 1 for r, a in enumerate(args) if r != out_rank)  # no rows to them
        assert all(res is None for r, res in enumerate(results) if r != out_rank)
        result = results[out_rank]
        if isinstance(result, ScoredStep):  # it scored prompt positions too (a list each)
            assert len(result.scored[0]) > 0
            result = result.result
        if result is None:  # a step that only prefilled chunks
            assert len(args[out_rank]) == 1
            continue
        sampled_steps += 1
        (_, sampling) = args[out_rank]
        assert isinstance(sampling, StepSampling) and isinstance(result, SamplerOutput)
        num_rows = len(sampling.rows)
        assert len(result.token_ids) == num_rows
        # Rows ship the prompt only for penalties, the output only for penalties, min_tokens or
        # a bad word of several tokens.
        for row in sampling.rows:
            p = row.params
            assert p.needs_penalties or row.prompt_token_ids == ()
            output = p.needs_penalties or p.min_tokens > 0 or p.bad_words_need_history
            assert output or row.output_token_ids == ()
        # A few bytes per row (token, logprob, up to 3 alternatives), far from a vocab row.
        size = len(pickle.dumps(result))
        assert size < 128 + 96 * num_rows < num_rows * vocab * 4, (size, num_rows)
    assert sampled_steps >= 6


def test_pp2_abort_in_flight_keeps_seeded_tokens_and_leaks_nothing(reference, dist_model):
    engine = _engine(dist_model, pp=2)
    try:
        executor = engine.executor
        assert engine.pipeline_depth == 2 and executor.samples_remotely
        done, aborted = _run(engine, abort_in_flight=True)
        assert executor.max_in_flight == 2 and executor.num_in_flight == 0
        assert executor.failure is None
    finally:
        engine.shutdown()
    assert all(o.finish_reason == "abort" for o in done[aborted].outputs)
    for name in PARAMS:
        if name not in (aborted, "unseeded"):
            _assert_same(reference[name], done[name], name)
    # Every block is back in the pool, nothing is in flight, no request is left behind.
    assert engine.kv_stats().num_used_blocks == 0
    assert not engine.scheduler.in_flight and not engine.scheduler.kv.block_tables
    assert not engine.requests and not engine._in_flight


def test_step_sampling_repeats_fork_rows_and_survives_pickling():
    """A fork's logits row is repeated per sample; after pickling, rows still share one params
    object and give the driver-side sampler's tokens (seeded rows are (seed, step) generators)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)  # [num_sampling_seqs, vocab]
    forked = SamplingParams(n=3, temperature=1.0, seed=5, logprobs=2)
    single = SamplingParams(temperature=0.7, top_p=0.8, seed=9, repetition_penalty=1.2)
    rows = [SamplingRow(single, [1, 2], [3], 1, 0)]
    rows += [SamplingRow(forked, (), (), 0, i) for i in range(3)]
    rows += [SamplingRow(SamplingParams(temperature=0), (), (), 4, 0)]
    sampling = pickle.loads(pickle.dumps(StepSampling(rows, [1, 3, 1])))
    assert len({id(r.params) for r in sampling.rows[1:4]}) == 1
    got = sampling.sample(Sampler(seed=1), logits)
    want = Sampler(seed=1).sample(logits[[0, 1, 1, 1, 2]], rows)
    assert got == want
    assert len(set(got.token_ids[1:4])) > 1  # the three samples of the fork differ
    with pytest.raises(ValueError, match=r"num_samples \[1, 2\] must give one count per"):
        StepSampling(rows, [1, 2]).sample(Sampler(), logits)


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2)], ids=["tp2", "pp2"])
def test_speculative_decoding_on_ranks_matches_in_process(dist_model, layout):
    """n-gram drafts verified on the output rank: greedy and seeded random tokens (and the
    greedy logprobs) equal the in-process speculative engine's, which equal plain decoding's
    for greedy rows."""
    rng = random.Random(8)
    prompts = [[rng.randrange(3, 384) for _ in range(4)] * 4 for _ in range(3)]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    seeded = SamplingParams(temperature=0.8, seed=4, max_tokens=16, ignore_eos=True)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}

    def run(engine, params):
        for i, p in enumerate(prompts):
            engine.add_request(None, params, prompt_token_ids=p, request_id=str(i))
        done = {}
        for _ in range(300):
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[str(i)] for i in range(len(prompts))]

    results = {}
    runs = (("plain", {}), ("spec", dict(spec=spec)), ("ranks", dict(spec=spec, **layout)))
    for name, kw in runs:
        engine = _engine(dist_model, tp=kw.get("tp", 1), pp=kw.get("pp", 1),
                         speculative_config=kw.get("spec"))  # fmt: skip
        try:
            results[name] = (run(engine, greedy), run(engine, seeded))
            if name != "plain":
                assert engine.scheduler.num_accepted_tokens > 0
        finally:
            engine.shutdown()
    for a, b in zip(results["plain"][0], results["spec"][0], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for mode in (0, 1):
        for a, b in zip(results["spec"][mode], results["ranks"][mode], strict=True):
            _assert_same(a, b, f"request {a.request_id}")
