"""TP=2, PP=2 and TP=2 x PP=2 (worker processes, gloo) give the TP=1 greedy tokens, with as many
batches in flight as pipeline stages and every KV block back in the pool at the end.

Where a sequence differs, the first differing step must be a near-tie in the TP=1 run (its top two
log-probabilities within NEAR_TIE): the ranks sum partial products in another order, which may flip
an exact tie. Log-probabilities of the agreeing steps stay within LOGPROB_ATOL of TP=1.
"""

from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams

# float32 partial sums in another order: ~1e-6 relative per reduction; log-probabilities here are
# O(1-10), so 1e-4 absolute leaves a wide margin while catching any real error (O(0.1) and up).
LOGPROB_ATOL = 1e-4
NEAR_TIE = 1e-3
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    lengths = (40, 5, 17)  # 40 > the 32-token budget: chunked prefill over two steps
    return [[rng.randrange(3, 384) for _ in range(n)] for n in lengths]


def _generate(model: str, **kw):
    llm = LLM(
        model=model,
        dtype="float32",
        device="cpu",
        kv_cache_memory_bytes=4 << 20,
        max_num_batched_tokens=32,
        **kw,
    )
    try:
        outputs = llm.generate(prompt_token_ids=_prompts(), sampling_params=PARAMS, use_tqdm=False)
        return [o.outputs[0] for o in outputs], llm.engine
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def reference(dist_model):
    outputs, engine = _generate(dist_model)
    assert engine.runner is not None  # TP=1 x PP=1: the in-process runner, no workers
    return outputs


def assert_same_greedy(reference, outputs) -> int:
    """Tokens equal until a near-tie of the reference; logprobs close. Returns #tokens compared."""
    compared = 0
    for i, (want, got) in enumerate(zip(reference, outputs, strict=True)):
        for step, (a, b) in enumerate(zip(want.token_ids, got.token_ids, strict=True)):
            ref_lp = want.logprobs[step]
            if a != b:
                top1, top2 = sorted(ref_lp.values(), reverse=True)[:2]
                assert top1 - top2 < NEAR_TIE, (
                    f"sequence {i} step {step}: token {b} instead of {a}, but the reference's top "
                    f"two log-probabilities differ by {top1 - top2:.2e} (not a near-tie)"
                )
                break
            assert abs(got.logprobs[step][b] - ref_lp[a]) < LOGPROB_ATOL, (i, step)
            compared += 1
    return compared


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_parallel_matches_single(tp, pp, reference, dist_model):
    outputs, engine = _generate(dist_model, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert assert_same_greedy(reference, outputs) >= 20
    executor = engine.executor
    assert executor.kind == "mp" and executor.collective_backend == "gloo"
    # Each stage ran its own contiguous layers: 3 layers over pp=2 is 2 + 1.
    layers = {info.layers for info in executor.infos}
    assert layers == ({(0, 3)} if pp == 1 else {(0, 2), (2, 3)})
    report = "\n".join(engine.startup_report())
    assert f"tensor_parallel {tp} x pipeline_parallel {pp}, collectives gloo" in report
    assert executor.failure is None
    # PP stages overlap: as many batches in flight as stages (the driver had pp outstanding).
    assert executor.max_in_flight == pp and executor.num_in_flight == 0
    assert engine.kv_stats().num_used_blocks == 0 and not engine.scheduler.in_flight
