"""Turns a step's logits into tokens: penalties, temperature, min-p/top-k/top-p, seeded sampling.

Order (vLLM's): min_tokens mask -> penalties -> greedy argmax, or temperature -> min-p -> top-k ->
top-p -> sample. Returned logprobs are of the raw model distribution (log_softmax of the logits as
given, before any processing), vLLM's default "raw_logprobs" mode.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.sampling_params import SamplingParams
from engine.structured_output import allowed_tokens

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """The generator seed for one (request seed, decode step): well mixed, in [0, 2**64)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))


@dataclass
class SamplingRow:
    """One sequence's row of the logits: its parameters and token history.

    Histories may be lists or int tensors (an engine that keeps token tensors saves the copy).
    step: which decode step this row samples (default len(output_token_ids)). sample_index: this
    sequence's index among its request's n samples; its seed is params.seed + sample_index (vLLM
    V1's rule; pass 0 when params is already `params.child(i)`). A seeded row draws its noise from
    a generator seeded by (seed, step), so its tokens depend only on its own seed and history,
    never on the batch around it, and survive preemption-by-recompute unchanged.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int] | torch.Tensor
    output_token_ids: Sequence[int] | torch.Tensor
    step: int | None = None
    sample_index: int = 0
    # Structured outputs: the tokens this row may pick, int32 bitmask words (bit t = token t;
    # `engine.structured_output`), filled by the engine before the step; None: no constraint.
    token_bitmask: torch.Tensor | None = None
    # A drafted constrained row (speculative decoding): one mask per logits row of the step,
    # int32 [1 + len(draft), words] (row j: after the drafts before it).
    draft_bitmasks: torch.Tensor | None = None

    @property
    def step_index(self) -> int:
        return len(self.output_token_ids) if self.step is None else self.step

    @property
    def seed(self) -> int | None:
        return None if self.params.seed is None else self.params.seed + self.sample_index


@dataclass
class SamplerOutput:
    """Per row: the sampled token, its raw logprob, the top-k alternatives and the sampled
    token's rank in the row's distribution (1 + the tokens strictly more likely) (None: not
    asked)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]
    ranks: list[int | None] = field(default_factory=list)
    # Speculative steps: row -> (the tokens its drafts gave: accepted drafts then the target's
    # token; (logprob, top-k, rank) per token or None). Such a row's other fields are its first
    # token's / None.
    drafted: dict[int, tuple[list[int], list[tuple] | None]] = field(default_factory=dict)


class PendingSamples:
    """Samples on their way to the host: the copies start at creation (from the device, into
    pinned memory, without waiting), so the caller can launch more work before `result()` waits
    for them. samples None: nothing to return (a rank that does not sample)."""

    def __init__(self, samples: DeviceSamples | None) -> None:
        self.samples = samples
        self.host: list[torch.Tensor] = []
        self.event = None
        if samples is None:
            return
        parts = [samples.token_ids, *(samples.logprobs or ())]
        if samples.token_ids.device.type == "cpu":
            self.host = parts
            return
        for t in parts:
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            self.host.append(h)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(samples.token_ids.device))

    def result(self) -> SamplerOutput | None:
        if self.samples is None:
            return None
        if self.event is not None:
            self.event.synchronize()
        token_ids = self.host[0].tolist()
        n = len(token_ids)
        chosen: list[float | None] = [None] * n
        tops: list[dict[int, float] | None] = [None] * n
        ranks: list[int | None] = [None] * n
        s = self.samples
        if s.want:
            c, v, i, r = (t.tolist() for t in self.host[1:])
            lp, top = logprob_lists(c, v, i, s.num_top)
            for j, row in enumerate(s.want):
                chosen[row], tops[row], ranks[row] = lp[j], top[j], r[j]
        return SamplerOutput(token_ids, chosen, tops, ranks)


# torch.argmax over a few long rows is slow on a GPU (H200, one row of a 128k vocabulary: 26 us a
# step, twenty-second session): rows of at least ARGMAX_CHUNKED_MIN values, in batches of at most
# ARGMAX_CHUNKED_MAX_ROWS, take the maximum of each chunk (with its index) and then the argmax of
# those, the same index: chunks in order, first maximal index in each and of the chunks.
ARGMAX_CHUNKED_MIN = 8192
ARGMAX_CHUNKED_MAX_ROWS = 64
ARGMAX_CHUNK = (512, 4096)  # chunk lengths tried (a divisor of the row), else rows padded to 1024


@functools.cache
def _argmax_chunk(n: int) -> int:
    """The chunk length for rows of n values: the least divisor of n in ARGMAX_CHUNK, else 1024
    (the row padded). Cached: the search is a Python loop and every step asks again."""
    lo, hi = ARGMAX_CHUNK
    return next((c for c in range(lo, min(hi, n) + 1) if n % c == 0), 1024)


def argmax_rows(x: torch.Tensor, chunked: bool | None = None) -> torch.Tensor:
    """x.argmax(dim=-1) of a 2-D float tensor (first maximal index; NaN counts as the maximum),
    in two reductions where `chunked` (None: on a GPU, for rows of at least ARGMAX_CHUNKED_MIN,
    at most ARGMAX_CHUNKED_MAX_ROWS rows)."""
    rows, n = x.shape
    if chunked is None:
        chunked = (
            x.device.type != "cpu" and n >= ARGMAX_CHUNKED_MIN and rows <= ARGMAX_CHUNKED_MAX_ROWS
        )
    if not chunked or n == 0 or rows == 0:
        return x.argmax(dim=-1)
    size = _argmax_chunk(n)
    if n % size:  # -inf past the end: never before an equal value, never above another
        x = torch.nn.functional.pad(x, (0, -n % size), value=float("-inf"))
    values, index = x.reshape(rows, -1, size).max(dim=-1)  # [rows, chunks]
    chunk = values.argmax(dim=-1, keepdim=True)
    return (chunk * size + index.gather(1, chunk)).squeeze(1)


def _to_device_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a stream sync (through pinned memory on a GPU)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device` without a stream sync: through pinned memory on a GPU (a
    pageable copy would wait for the work queued before it, which asynchronous steps avoid)."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def apply_min_tokens(
    logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Iterable[int]
) -> None:
    """In place: rows with fewer than min_tokens outputs cannot pick EOS or a stop token id.

    EOS stays allowed when ignore_eos is set (it does not stop the sequence then), as in vLLM.
    """
    # logits: [num_rows, vocab]
    eos = tuple(eos_token_ids)
    for i, row in enumerate(rows):
        p = row.params
        if row.step_index >= p.min_tokens:  # outputs so far
            continue
        banned = set(p.stop_token_id_set)
        if not p.ignore_eos:
            banned.update(eos)
        if banned:
            logits[i, sorted(banned)] = float("-inf")


def apply_logit_edits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place: each row's logit_bias added, then every token outside its allowed_token_ids or
    its structured-output bitmask, and the tokens its bad_words ban here, set to -inf (rows
    without any are untouched)."""
    masked = [i for i, row in enumerate(rows) if row.token_bitmask is not None]
    if masked:
        words = torch.stack([rows[i].token_bitmask for i in masked])
        allowed = allowed_tokens(_to_device_tensor(words, logits.device), logits.shape[-1])
        logits[masked] = logits[masked].masked_fill(~allowed, float("-inf"))
    for i, row in enumerate(rows):
        p = row.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.int64, device=logits.device)
            bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
            logits[i].index_add_(0, ids, bias.to(logits.device))
        if p.allowed_token_ids is not None:
            keep = torch.tensor(p.allowed_token_ids, dtype=torch.int64, device=logits.device)
            masked = torch.full_like(logits[i], float("-inf"))
            masked[keep] = logits[i, keep]
            logits[i] = masked
        if p.bad_words_token_ids:
            banned = banned_by_bad_words(p.bad_words_token_ids, row.output_token_ids)
            if banned:
                logits[i, banned] = float("-inf")


def banned_by_bad_words(
    words: Sequence[Sequence[int]], output: Sequence[int] | torch.Tensor
) -> list[int]:
    """The last token of every bad word whose other tokens end the output so far (every
    one-token word's), sorted and distinct."""
    longest = max(len(w) for w in words) - 1
    tail = output[len(output) - longest :] if longest else ()
    tail = tuple(tail.tolist() if isinstance(tail, torch.Tensor) else tail)
    banned = {
        w[-1] for w in words if len(w) == 1 or tail[len(tail) - len(w) + 1 :] == tuple(w[:-1])
    }
    return sorted(banned)


def _flat_token_ids(
    seqs: Sequence[Sequence[int] | torch.Tensor], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Flat indices row * vocab_size + token of every token in seqs; int64 [total_tokens].

    Goes through numpy: converting Python ints one list at a time is the cost here.
    """
    parts = [
        s.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
        if isinstance(s, torch.Tensor)
        else np.fromiter(s, dtype=np.int64, count=len(s))
        for s in seqs
    ]
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise ValueError(
            f"token ids in a sequence's history must be in [0, {vocab_size}), got {int(bad)}"
        )
    rows = np.repeat(np.arange(len(parts), dtype=np.int64), lengths)
    return torch.from_numpy(rows * vocab_size + ids).to(device)


def token_counts(
    seqs: Sequence[Sequence[int] | torch.Tensor], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """counts[i, t] = how often token t occurs in seqs[i]; float32 [len(seqs), vocab_size].

    float32 counts are exact below 2**24 and feed the penalty arithmetic directly.
    """
    flat = _flat_token_ids(seqs, vocab_size, device)
    counts = torch.zeros(len(seqs) * vocab_size, dtype=torch.float32, device=device)
    counts.index_add_(0, flat, torch.ones(flat.shape[0], dtype=torch.float32, device=device))
    return counts.view(len(seqs), vocab_size)


def token_mask(
    seqs: Sequence[Sequence[int] | torch.Tensor], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """mask[i, t] = token t occurs in seqs[i]; bool [len(seqs), vocab_size]."""
    flat = _flat_token_ids(seqs, vocab_size, device)
    mask = torch.zeros(len(seqs) * vocab_size, dtype=torch.bool, device=device)
    mask[flat] = True
    return mask.view(len(seqs), vocab_size)


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int] | torch.Tensor],
    output_token_ids: Sequence[Sequence[int] | torch.Tensor],
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """vLLM/HF penalties; returns new logits.

    Repetition (HF's RepetitionPenaltyLogitsProcessor, over prompt + output tokens): a seen token's
    logit is divided by the penalty if positive, multiplied if not. Then, over output tokens only
    (OpenAI semantics): logit -= frequency * count + presence * (count > 0).
    """
    # logits: [num_rows, vocab]; penalties: float32 [num_rows]
    vocab_size = logits.shape[-1]
    device = logits.device
    output_counts = token_counts(output_token_ids, vocab_size, device)
    seen = token_mask(prompt_token_ids, vocab_size, device) | (output_counts > 0)
    rep = repetition_penalty.to(device)[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - frequency_penalty.to(device)[:, None] * output_counts
    logits = logits - presence_penalty.to(device)[:, None] * (output_counts > 0)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Masks tokens whose probability is below min_p * (the row's top probability)."""
    # logits: [num_rows, vocab]; min_p: [num_rows]
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Top-k then top-p (nucleus) masking, vLLM's formulation.

    Top-k keeps tokens whose logit is >= the k-th largest (ties at the k-th value all survive);
    k = vocab means off. Top-p keeps the smallest set of most likely tokens whose probability (after
    top-k, renormalized) reaches p: a token is dropped when the tokens strictly more likely than
    it already hold >= p. The most likely token always survives.
    """
    # logits: [num_rows, vocab]; top_k: int64 [num_rows]; top_p: float32 [num_rows]
    vocab_size = logits.shape[-1]
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth = logits_sort.gather(1, (vocab_size - top_k.clamp(1, vocab_size))[:, None])
        logits_sort = logits_sort.masked_fill(logits_sort < kth, float("-inf"))
    if top_p is not None:
        probs_sort = logits_sort.softmax(dim=-1)
        probs_cum = probs_sort.cumsum(dim=-1)
        drop = probs_cum <= 1 - top_p[:, None]
        drop[:, -1] = False
        logits_sort = logits_sort.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, logits_idx, logits_sort)


def gather_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int]
) -> tuple[list[float], list[dict[int, float]]]:
    """Raw log_softmax of each row at token_ids[i], and its num_top[i] most likely tokens.

    Also serves prompt logprobs: pass the logits of prompt positions and the next prompt tokens.
    """
    # logits: [num_rows, vocab]; token_ids: int64 [num_rows]
    chosen, values, indices, _ = logprob_tensors(logits, token_ids, num_top)
    return logprob_lists(chosen.tolist(), values.tolist(), indices.tolist(), num_top)


def logprob_tensors(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """gather_logprobs on the device: chosen [num_rows], top values and indices [num_rows, k_max]
    (k_max = the largest num_top; width 0 when none asks for alternatives), and the chosen
    tokens' ranks [num_rows] (1 + how many tokens of the row are strictly more likely)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.to(logprobs.device)[:, None]).squeeze(1)
    k_max = min(max(num_top, default=0), logprobs.shape[-1])
    values, indices = logprobs.topk(k_max, dim=-1)
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    return chosen, values, indices, ranks


def logprob_lists(
    chosen: list[float], values: list[list[float]], indices: list[list[int]], num_top: Sequence[int]
) -> tuple[list[float], list[dict[int, float]]]:
    """logprob_tensors' results (as lists) in gather_logprobs' form."""
    tops = [dict(zip(indices[i][:k], values[i][:k], strict=True)) for i, k in enumerate(num_top)]
    return chosen, tops


@dataclass
class PromptRows:
    """The prompt positions a step scores (`SamplingParams.prompt_logprobs`): the hidden state of
    the step's token rows[i] predicts prompt token targets[i]; num_top[i] alternatives."""

    rows: list[int]
    targets: list[int]
    num_top: list[int]


@dataclass
class ScoredStep:
    """What an executor returns for a step that carried PromptRows: the step's usual result
    (logits, a SamplerOutput or None) and the prompt rows' (logprobs, top-k dicts, ranks)."""

    result: object
    scored: tuple[list[float], list[dict[int, float]], list[int]]


@dataclass
class DeviceSamples:
    """A step's samples still on the device: token ids [num_rows], and for the rows in `want`
    their logprob tensors (`logprob_tensors`) with each row's number of alternatives."""

    token_ids: torch.Tensor
    want: list[int] = field(default_factory=list)
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    num_top: list[int] = field(default_factory=list)


class Sampler:
    """Samples one token per logits row.

    eos_token_ids: masked while a row is under min_tokens. seed: seeds the shared generator that
    rows without their own seed draw from (one batched draw per step).
    """

    def __init__(self, eos_token_ids: Iterable[int] = (), seed: int = 0):
        self.eos_token_ids = tuple(eos_token_ids)
        self.seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}

    def shared_generator(self, device: torch.device) -> torch.Generator:
        """The generator unseeded random rows draw from on `device` (seeded by the sampler's
        seed), also the speculative verifier's."""
        return self._shared_generator(device)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed & _MASK64)
            self._shared[device] = g
        return self._shared[device]

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """logits: [num_rows, vocab] (any float dtype, processed in float32), one row per entry.

        Work is skipped where no row asks for it (min_tokens, penalties, logprobs), an all-greedy
        batch is one argmax, and the tokens come back to the host in one transfer.
        """
        return PendingSamples(self.sample_tokens(logits, rows)).result()

    def sample_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> DeviceSamples:
        """`sample` without waiting for the device (no host transfer): the samples and the
        requested logprobs stay on logits' device (the engine's asynchronous steps)."""
        token_ids, want = self._sample(logits, rows)
        if not want:
            return DeviceSamples(token_ids)
        num_top = [rows[i].params.logprobs for i in want]
        lp = logprob_tensors(logits[want], token_ids[want], num_top)
        return DeviceSamples(token_ids, want, lp, num_top)

    def _sample(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> tuple[torch.Tensor, list[int]]:
        """(token ids int64 [num_rows] on logits' device, the rows that want logprobs)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}"
            )
        num_rows = len(rows)
        device = logits.device
        # One pass over the rows; rows usually share a few SamplingParams objects.
        kinds: dict[int, tuple[bool, bool, bool, bool, bool]] = {}
        greedy: list[int] = []
        rand: list[int] = []
        pen: list[int] = []
        want: list[int] = []
        edit: list[int] = []  # rows with logit_bias / allowed_token_ids
        min_tok = False
        for i, r in enumerate(rows):
            p = r.params
            kind = kinds.get(id(p))
            if kind is None:
                kind = kinds[id(p)] = (
                    p.is_greedy,
                    p.needs_penalties,
                    p.logprobs is not None,
                    p.min_tokens > 0,
                    p.changes_logits,
                )
            (greedy if kind[0] else rand).append(i)
            if kind[1]:
                pen.append(i)
            if kind[2]:
                want.append(i)
            if kind[3]:
                min_tok = True
            if kind[4]:
                edit.append(i)

        if not rand and not min_tok and not pen and not edit:
            # All greedy, nothing to change: the argmax of the logits as they are (a float32
            # copy orders them the same, ties included), without a copy of [rows, vocab].
            return argmax_rows(logits), want
        if min_tok or pen or edit or logits.dtype != torch.float32:
            x = logits.to(torch.float32, copy=True)
        else:
            x = logits  # read only below: every in-place change works on a copy
        if edit:
            sub = x[edit]
            apply_logit_edits(sub, [rows[i] for i in edit])
            x[edit] = sub
        if min_tok:
            apply_min_tokens(x, rows, self.eos_token_ids)
        if pen:
            sub = x[pen] if len(pen) < num_rows else x
            sub = apply_penalties(
                sub,
                [rows[i].prompt_token_ids for i in pen],
                [rows[i].output_token_ids for i in pen],
                self._param(rows, pen, "repetition_penalty", device),
                self._param(rows, pen, "presence_penalty", device),
                self._param(rows, pen, "frequency_penalty", device),
            )
            if len(pen) < num_rows:
                x[pen] = sub
            else:
                x = sub

        # torch.argmax returns the first maximal index: ties go to the lowest token id.
        if not rand:
            token_ids = argmax_rows(x)
        elif not greedy:
            token_ids = self._sample_random(x, rows)
        else:
            token_ids = torch.empty(num_rows, dtype=torch.int64, device=device)
            token_ids[greedy] = argmax_rows(x[greedy])
            token_ids[rand] = self._sample_random(x[rand], [rows[i] for i in rand])
        return token_ids, want

    @staticmethod
    def _param(rows: Sequence[SamplingRow], idx: list[int], name: str, device) -> torch.Tensor:
        values = [float(getattr(rows[i].params, name)) for i in idx]
        return _to_device(values, torch.float32, device)

    def _sample_random(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, min-p, top-k, top-p, then argmax(probs / q) with q ~ Exp(1) per token."""
        # x: [num_rand, vocab] float32, penalties applied
        num_rows, vocab_size = x.shape
        device = x.device
        idx = list(range(num_rows))
        x = x / self._param(rows, idx, "temperature", device)[:, None]

        # Truncation runs only on the rows that ask for it, so a row's result never depends on
        # which other rows share its batch.
        mp = [i for i, r in enumerate(rows) if r.params.min_p > 0]
        if len(mp) == num_rows:
            x = apply_min_p(x, self._param(rows, mp, "min_p", device))
        elif mp:
            x[mp] = apply_min_p(x[mp], self._param(rows, mp, "min_p", device))
        kp = [i for i, r in enumerate(rows) if r.params.top_k != -1 or r.params.top_p < 1.0]
        if kp:
            ks = [rows[i].params.top_k for i in kp]
            ps = [rows[i].params.top_p for i in kp]
            top_k = None
            if any(k != -1 for k in ks):
                top_k = _to_device(
                    [vocab_size if k == -1 else min(k, vocab_size) for k in ks], torch.int64, device
                )
            top_p = None
            if any(p < 1.0 for p in ps):
                top_p = _to_device(ps, torch.float32, device)
            if len(kp) == num_rows:
                x = apply_top_k_top_p(x, top_k, top_p)
            else:
                x[kp] = apply_top_k_top_p(x[kp], top_k, top_p)

        probs = torch.softmax(x, dim=-1)
        # Gumbel-max in exponential form: argmax(p / q), q ~ Exp(1), picks token t with
        # probability p_t. Seeded rows draw q from their own (seed, step) generator.
        q = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(rows) if r.params.seed is not None]
        if not seeded:
            q.exponential_(generator=self._shared_generator(device))
        else:
            if len(seeded) < num_rows:
                seeded_set = set(seeded)
                shared = [i for i in range(num_rows) if i not in seeded_set]
                noise = torch.empty(len(shared), vocab_size, device=device)
                q[shared] = noise.exponential_(generator=self._shared_generator(device))
            for i in seeded:
                row = rows[i]
                g = torch.Generator(device=device)
                g.manual_seed(step_seed(row.seed, row.step_index))
                q[i].exponential_(generator=g)
        # q can be exactly 0; 0 / 0 would be NaN, which argmax treats as the maximum.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return (probs / q).argmax(dim=-1)
