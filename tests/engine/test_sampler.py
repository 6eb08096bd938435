"""Sampler: greedy, masks and penalties against explicit formulas, seeded batch independence,
empirical distributions (fixed seeds, so deterministic) and raw logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from engine.sampler import (
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    argmax_rows,
    gather_logprobs,
    step_seed,
    token_counts,
    token_mask,
)
from engine.sampling_params import SamplingParams

VOCAB = 50
NEG_INF = float("-inf")


def row(params: SamplingParams, prompt=(), output=(), step=None) -> SamplingRow:
    return SamplingRow(params, list(prompt), list(output), step)


def rand_logits(num_rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab, generator=g) * 3


# Chi-square critical values at p = 0.001 (a deterministic run with a fixed seed; a wrong
# distribution lands far above these).
CHI2_CRIT_001 = {3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was sampled"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_greedy_is_argmax_lowest_index_on_ties():
    logits = rand_logits(4)
    logits[1, 7] = logits[1, 30] = logits[1].max() + 1  # tie: 7 wins
    out = Sampler().sample(logits, [row(SamplingParams(temperature=0.0))] * 4)
    expected = logits.argmax(dim=-1).tolist()
    assert out.token_ids == expected and out.token_ids[1] == 7
    assert out.logprobs == [None] * 4 and out.top_logprobs == [None] * 4


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [8192, 128256, 9001, 65536 + 3])  # chunk 512 / 1002 / pad / pad
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_argmax_is_torch_argmax(device, n, dtype):
    # The two-reduction argmax gives torch.argmax's index: ties to the first, ties across chunk
    # edges, NaN as the maximum (its first one), all -inf rows, -0.0 against +0.0, the last
    # value (in the padding's chunk).
    g = torch.Generator().manual_seed(n)
    x = torch.randn(8, n, generator=g).to(dtype)
    top = x.float().max() + 1
    x[1, 3] = x[1, n - 2] = top  # tie far apart
    x[2, 1001] = x[2, 1002] = top  # tie across a chunk edge (1002-value chunks)
    x[3, 500] = x[3, 7000] = float("nan")
    x[3, 20] = float("inf")
    x[4] = float("-inf")
    x[5] = 0.0
    x[5, 5] = -0.0
    x[6, n - 1] = top
    x[7] = torch.round(x[7])  # many ties
    x = x.to(device)
    assert torch.equal(argmax_rows(x, chunked=True), x.argmax(dim=-1))
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert argmax_rows(x, chunked=True).tolist()[1:7] == [3, 1001, 500, 0, 0, n - 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_greedy_on_half_logits_is_the_float32_argmax(dtype):
    # An all-greedy batch takes the argmax of the logits as given (no float32 copy): the same
    # tokens, ties to the lowest id (values exact in float32, so the order is the same).
    logits = rand_logits(5).to(dtype)
    logits[2, 11] = logits[2, 3] = logits[2].max() + 1  # tie: 3 wins
    out = Sampler().sample(logits, [row(SamplingParams(temperature=0.0))] * 5)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist() and out.token_ids[2] == 3
    with_logprobs = Sampler().sample(logits, [row(SamplingParams(temperature=0.0, logprobs=2))] * 5)
    assert with_logprobs.token_ids == out.token_ids and with_logprobs.logprobs[0] is not None


def test_input_logits_not_modified():
    logits = rand_logits(3)
    before = logits.clone()
    p = SamplingParams(top_k=3, top_p=0.5, min_p=0.1, repetition_penalty=1.5, min_tokens=2)
    Sampler(eos_token_ids=[0]).sample(logits, [row(p, [1, 2], [3])] * 3)
    assert torch.equal(logits, before)


def ref_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    out = logits.clone()
    for i in range(logits.shape[0]):
        kth = sorted(logits[i].tolist(), reverse=True)[k - 1]
        for t in range(logits.shape[1]):
            if logits[i, t] < kth:
                out[i, t] = NEG_INF
    return out


def ref_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    out = torch.full_like(logits, NEG_INF)
    probs = torch.softmax(logits.double(), dim=-1)
    for i in range(logits.shape[0]):
        order = sorted(range(logits.shape[1]), key=lambda t: -probs[i, t].item())
        mass = 0.0
        for t in order:  # the smallest most-likely set whose mass reaches p
            out[i, t] = logits[i, t]
            mass += probs[i, t].item()
            if mass >= p:
                break
    return out


@pytest.mark.parametrize("k", [1, 2, 5, VOCAB])
def test_top_k_mask_matches_formula(k):
    logits = rand_logits(6, seed=k)
    logits[0, 3] = logits[0, 4] = logits[0].max() + 1.0  # a tie at the top
    got = apply_top_k_top_p(logits, torch.full((6,), k), None)
    want = ref_top_k(logits, k)
    assert torch.equal(got, want)
    if k == 1:  # both tied maxima survive top-1 (threshold semantics)
        assert torch.isfinite(got[0, 3]) and torch.isfinite(got[0, 4])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.95, 1.0])
def test_top_p_mask_matches_formula(p):
    logits = rand_logits(6, seed=int(p * 100))
    got = apply_top_k_top_p(logits, None, torch.full((6,), p))
    assert torch.equal(got, ref_top_p(logits, p))


def test_top_k_then_top_p_per_row_values():
    logits = rand_logits(3, seed=5)
    ks, ps = [4, VOCAB, 10], [0.6, 0.8, 1.0]
    got = apply_top_k_top_p(logits, torch.tensor(ks), torch.tensor(ps))
    for i, (k, p) in enumerate(zip(ks, ps, strict=True)):
        want = ref_top_p(ref_top_k(logits[i : i + 1], k), p)
        assert torch.equal(got[i : i + 1], want)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_mask_matches_formula(min_p):
    logits = rand_logits(5, seed=11)
    got = apply_min_p(logits, torch.full((5,), min_p))
    probs = torch.softmax(logits, dim=-1)
    for i in range(5):
        top = probs[i].max().item()
        for t in range(VOCAB):
            keep = probs[i, t].item() >= min_p * top
            assert (got[i, t].item() == logits[i, t].item()) if keep else got[i, t] == NEG_INF


def test_repetition_penalty_matches_transformers():
    logits = rand_logits(3, seed=2)
    prompts = [[1, 2, 3, 3], [10, 20], [5]]
    outputs = [[4, 1], [20, 30, 30], []]
    penalties = [1.3, 0.7, 2.0]
    got = apply_penalties(
        logits,
        prompts,
        outputs,
        torch.tensor(penalties),
        torch.zeros(3),
        torch.zeros(3),
    )
    for i in range(3):
        ids = torch.tensor([prompts[i] + outputs[i]])
        want = RepetitionPenaltyLogitsProcessor(penalties[i])(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(got[i : i + 1], want, rtol=0, atol=0)


def test_token_counts_and_mask_lists_and_tensors():
    seqs = [[3, 1, 3, 3], torch.tensor([0, 4]), [], (2,)]
    counts = token_counts(seqs, 5, torch.device("cpu"))
    want = torch.tensor(
        [[0, 1, 0, 3, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.float32
    )
    assert torch.equal(counts, want)
    assert torch.equal(token_mask(seqs, 5, torch.device("cpu")), want > 0)


def test_presence_frequency_penalties_on_output_only():
    logits = rand_logits(2, seed=3)
    prompts = [[7, 7, 8], [1]]
    outputs = [[8, 9, 9, 9], [1, 1, 2]]
    presence, frequency = [0.5, -1.0], [0.25, 1.5]
    got = apply_penalties(
        logits,
        prompts,
        outputs,
        torch.ones(2),
        torch.tensor(presence),
        torch.tensor(frequency),
    )
    want = logits.clone()
    for i in range(2):
        for t in set(outputs[i]):  # prompt-only tokens (7) stay untouched
            want[i, t] -= frequency[i] * outputs[i].count(t) + presence[i]
    torch.testing.assert_close(got, want)


def test_greedy_uses_penalized_logits():
    logits = torch.zeros(1, 6)
    logits[0] = torch.tensor([0.0, 3.0, 2.9, 2.1, -1.0, 1.0])
    p = SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.5)
    # 1 was in the prompt: 3.0 / 1.5 = 2.0; 2 was output twice: 2.9 / 1.5 - 2 * 0.5 < 1; -> 3 wins.
    out = Sampler().sample(logits, [row(p, prompt=[1], output=[2, 2])])
    assert out.token_ids == [3]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(4, 8)
    logits[:, 0] = 10.0  # EOS
    logits[:, 5] = 9.0  # a stop token id
    logits[:, 2] = 8.0
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5])
    p_ignore = SamplingParams(temperature=0, min_tokens=3, ignore_eos=True, stop_token_ids=[5])
    rows = [
        row(p, output=[1]),  # under min_tokens: EOS and 5 banned -> 2
        row(p, output=[1, 1, 1]),  # reached: EOS allowed
        row(p_ignore, output=[1]),  # ignore_eos: EOS allowed, 5 still banned
        row(SamplingParams(temperature=0, min_tokens=3), output=[1]),  # no stop ids: 5 allowed
    ]
    assert Sampler(eos_token_ids=[0]).sample(logits, rows).token_ids == [2, 0, 0, 5]


def run_steps(sampler, logits_fn, params_list, steps, history=None):
    """Samples `steps` tokens for each row in one batch; returns each row's tokens."""
    outs = [[] for _ in params_list]
    for step in range(steps):
        logits = torch.cat([logits_fn(i, step) for i in range(len(params_list))])
        res = sampler.sample(
            logits, [row(p, prompt=[1, 2], output=outs[i]) for i, p in enumerate(params_list)]
        )
        for i, t in enumerate(res.token_ids):
            outs[i].append(t)
    return outs


def test_seeded_rows_do_not_depend_on_batch():
    def logits_fn(i, step):  # the same logits for a given (row content, step)
        return rand_logits(1, 64, seed=1000 * step + 7)

    target = SamplingParams(temperature=0.9, top_k=40, seed=1234, repetition_penalty=1.1)
    alone = run_steps(Sampler(seed=1), logits_fn, [target], steps=12)[0]
    others = [
        SamplingParams(temperature=1.3),  # shared generator
        SamplingParams(temperature=0.5, top_p=0.8, seed=99),
        SamplingParams(temperature=0),
        SamplingParams(min_p=0.2, presence_penalty=1.0),
    ]
    batched = run_steps(Sampler(seed=2), logits_fn, [others[0], target, *others[1:]], steps=12)
    assert batched[1] == alone
    reversed_batch = run_steps(Sampler(seed=3), logits_fn, [*others[::-1], target], steps=12)
    assert reversed_batch[-1] == alone
    # A different seed gives a different sequence (12 steps over ~40 tokens).
    other_seed = SamplingParams(temperature=0.9, top_k=40, seed=1235, repetition_penalty=1.1)
    assert run_steps(Sampler(seed=1), logits_fn, [other_seed], steps=12)[0] != alone


def test_sample_index_offsets_seed_like_child_params():
    def logits_fn(i, step):
        return rand_logits(1, 64, seed=step)

    parent = SamplingParams(n=3, temperature=1.0, seed=50)
    outs = [[], [], []]
    sampler = Sampler()
    for step in range(10):
        logits = torch.cat([logits_fn(0, step)] * 3)
        rows = [SamplingRow(parent, [1], outs[i], sample_index=i) for i in range(3)]
        for i, t in enumerate(sampler.sample(logits, rows).token_ids):
            outs[i].append(t)
    assert outs[0] != outs[1] != outs[2]
    for i in range(3):
        assert run_steps(Sampler(), logits_fn, [parent.child(i)], steps=10)[0] == outs[i]


def test_step_seed_mixes():
    seeds = {step_seed(s, k) for s in range(20) for k in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2**64 for s in seeds)
    assert step_seed(-1, 0) != step_seed(0, 0)


def empirical(sampler, logits_row, params_for, num):
    rows = [row(params_for(j)) for j in range(num)]
    out = sampler.sample(logits_row.expand(num, -1).contiguous(), rows)
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits_row.shape[-1]).double()


def test_temperature_sampling_distribution_shared_generator():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]])
    temp = 0.6
    counts = empirical(Sampler(seed=0), logits[0], lambda j: SamplingParams(temperature=temp), 6000)
    probs = torch.softmax(logits[0].double() / temp, dim=-1)
    assert chi_square(counts, probs) < CHI2_CRIT_001[7]
    # The test can fail: the same counts against the untempered distribution are far off.
    assert chi_square(counts, torch.softmax(logits[0].double(), dim=-1)) > 10 * CHI2_CRIT_001[7]


def test_seeded_sampling_distribution_across_seeds():
    logits = torch.tensor([[0.3, 1.1, -0.4, 0.9, 0.0]])
    counts = empirical(
        Sampler(), logits[0], lambda j: SamplingParams(temperature=1.0, seed=j), 4000
    )
    probs = torch.softmax(logits[0].double(), dim=-1)
    assert chi_square(counts, probs) < CHI2_CRIT_001[4]


def test_top_k_top_p_sampling_distribution():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0, -1.0, 0.5, 1.5]])
    params = SamplingParams(temperature=1.0, top_k=5, top_p=0.9)
    counts = empirical(Sampler(seed=5), logits[0], lambda j: params, 5000)
    masked = ref_top_p(ref_top_k(logits, 5), 0.9)[0]
    probs = torch.softmax(masked.double(), dim=-1)
    assert (probs > 0).sum() == 4  # the truncation leaves 4 tokens here
    assert chi_square(counts, probs) < CHI2_CRIT_001[3]


def test_shared_generator_is_reproducible_by_engine_seed():
    logits = rand_logits(8)
    rows = [row(SamplingParams())] * 8
    a = [Sampler(seed=42).sample(logits, rows).token_ids for _ in range(2)]
    s = Sampler(seed=42)
    b = [s.sample(logits, rows).token_ids for _ in range(2)]
    assert a[0] == a[1] == b[0] and b[0] != b[1]


def test_logprobs_are_raw_log_softmax():
    logits = rand_logits(4, seed=9)
    params = [
        SamplingParams(temperature=0.5, logprobs=3, repetition_penalty=2.0, top_k=2),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(),
        SamplingParams(logprobs=VOCAB + 10, seed=3),
    ]
    out = Sampler().sample(logits, [row(p, [1, 2], [3]) for p in params])
    ref = torch.log_softmax(logits.double(), dim=-1)
    for i in (0, 1, 3):
        assert math.isclose(out.logprobs[i], ref[i, out.token_ids[i]].item(), abs_tol=1e-5)
    assert out.top_logprobs[1] == {} and out.logprobs[2] is None and out.top_logprobs[2] is None
    top = out.top_logprobs[0]
    want = torch.topk(ref[0], 3)
    assert list(top) == want.indices.tolist()
    for t, v in zip(want.indices.tolist(), want.values.tolist(), strict=True):
        assert math.isclose(top[t], v, abs_tol=1e-5)
    assert len(out.top_logprobs[3]) == VOCAB  # clamped to the vocabulary


def test_gather_logprobs_for_prompt_positions():
    logits = rand_logits(5, seed=4)
    targets = torch.tensor([3, 0, 49, 7, 7])
    chosen, tops = gather_logprobs(logits, targets, [0, 1, 2, 0, 5])
    ref = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(torch.tensor(chosen), ref[torch.arange(5), targets])
    assert [len(t) for t in tops] == [0, 1, 2, 0, 5]
    assert list(tops[1]) == [int(ref[1].argmax())]


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"logits must be \[num_rows=2, vocab\], got \(3, 50\)"):
        Sampler().sample(rand_logits(3), [row(SamplingParams())] * 2)
    p = SamplingParams(repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"must be in \[0, 50\), got 50"):
        Sampler().sample(rand_logits(1), [row(p, prompt=[1, 50])])
    with pytest.raises(ValueError, match=r"got -3"):
        Sampler().sample(rand_logits(1), [row(p, output=[-3])])


def test_bad_words_ban_a_words_last_token_where_its_prefix_ends_the_output():
    from engine.sampler import banned_by_bad_words

    words = [(7,), (3, 4), (1, 2, 5)]
    assert banned_by_bad_words(words, []) == [7]
    assert banned_by_bad_words(words, [9, 3]) == [4, 7]
    assert banned_by_bad_words(words, [1, 2]) == [5, 7]
    assert banned_by_bad_words(words, torch.tensor([8, 1, 2])) == [5, 7]  # tensor histories
    assert banned_by_bad_words(words, [2]) == [7]  # a prefix's tail is not the prefix
    assert banned_by_bad_words([(3, 4)], [4, 3, 9]) == []
    # in the sampler: greedy picks the best token the output's tail leaves allowed
    logits = rand_logits(2)
    best = int(logits[0].argmax())
    p = SamplingParams(temperature=0.0, bad_words=["x"])
    p.bad_words_token_ids = [(9, best)]  # as the engine would set from its tokenizer
    out = Sampler().sample(logits, [row(p, output=[1, 9]), row(p, output=[9, 1])])
    second = int(logits[0].topk(2).indices[1])
    assert out.token_ids == [second, int(logits[1].argmax())]


@pytest.mark.parametrize("device", DEVICES)
def test_logit_bias_and_allowed_tokens_edit_only_their_rows(device):
    # Row 0: a bias that makes token 11 the argmax; row 1: only tokens {3, 20, 41} allowed (the
    # argmax among them); row 2: untouched. Biased logits = logits + bias, exactly.
    logits = rand_logits(3).to(device)
    lead = float(logits[0].max() - logits[0, 11]) + 0.5
    biased = SamplingParams(temperature=0.0, logit_bias={11: lead, 12: -1.0})
    allowed = SamplingParams(temperature=0.0, allowed_token_ids=[3, 20, 41])
    plain = SamplingParams(temperature=0.0)
    out = Sampler().sample(logits, [row(biased), row(allowed), row(plain)])
    want_allowed = [3, 20, 41][int(logits[1, [3, 20, 41]].argmax())]
    assert out.token_ids == [11, want_allowed, int(logits[2].argmax())]
    # Random rows: the distribution of softmax(logits + bias) restricted to the allowed set.
    params = SamplingParams(temperature=1.0, seed=3, logit_bias={5: 2.0},
                            allowed_token_ids=[1, 5, 9, 30])  # fmt: skip
    # Tokens outside the allowed set lead by far; the allowed ones get 5-60% each.
    x = torch.full((1, VOCAB), 5.0)
    x[0, [1, 5, 9, 30]] = torch.tensor([1.0, 0.0, 0.5, -0.5])
    x = x.to(device)
    edited = torch.full((VOCAB,), NEG_INF)
    for t in (1, 5, 9, 30):
        edited[t] = float(x[0, t]) + (2.0 if t == 5 else 0.0)
    probs = torch.softmax(edited, dim=-1)
    counts = torch.zeros(VOCAB)
    sampler = Sampler()
    for step in range(2000):
        (tok,) = sampler.sample(x, [row(params, step=step)]).token_ids
        counts[tok] += 1
    assert chi_square(counts, probs) < CHI2_CRIT_001[3]
    # Logprobs stay those of the raw logits (vLLM's default).
    lp = Sampler().sample(logits[:1], [row(SamplingParams(temperature=0.0, logprobs=0,
                                                         logit_bias={11: lead}))])  # fmt: skip
    raw = torch.log_softmax(logits[0].float(), dim=-1)[11]
    assert lp.token_ids == [11] and lp.logprobs[0] == pytest.approx(float(raw), abs=1e-6)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(logit_bias=[1, 2]), "logit_bias must be a dict"),
        (dict(logit_bias={-1: 1.0}), "logit_bias must map token ids"),
        (dict(logit_bias={3: float("nan")}), "logit_bias must map token ids"),
        (dict(allowed_token_ids=[]), "allowed_token_ids must be a non-empty list"),
        (dict(allowed_token_ids=[2, -4]), "allowed_token_ids must be a non-empty list"),
    ],
)
def test_logit_edit_params_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
