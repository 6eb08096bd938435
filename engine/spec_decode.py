"""Speculative decoding with n-gram proposals (vLLM's "ngram" method, also called prompt lookup):
a decode step of a sequence proposes up to k draft tokens by finding the latest earlier occurrence
of its last n tokens (n from prompt_lookup_max down to prompt_lookup_min) and copying what
followed it. The step then computes the last token and the drafts in one forward (k + 1 query
tokens), and `verify` keeps the longest prefix of drafts the target model agrees with plus one
token of its own, so each step emits 1 to k + 1 tokens.

Greedy rows accept a draft while it equals the argmax, then emit the argmax (the tokens greedy
decoding gives, one forward for several of them). Random rows use the rejection rule for a
point-mass proposal: draft d at a position with target distribution p is accepted with
probability p(d); on rejection the token comes from p with d removed (renormalized); after the
last accepted draft a bonus token comes from p. Each emitted token is distributed exactly as
sampling from p one step at a time (the rule of Leviathan et al. and Chen et al., 2023), though
seeded requests draw other random numbers than without speculation.

Requests whose sampling reads more than the logits (penalties, min_tokens still to enforce,
logit_bias / allowed_token_ids, n > 1) get no drafts: they decode one token a step as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.sampler import apply_min_p, apply_top_k_top_p, argmax_rows, step_seed
from engine.spec_config import SpeculativeConfig

__all__ = ["SpeculativeConfig", "can_speculate", "propose_ngram", "verify"]


class TokenHistory:
    """A sequence's token ids as a growing int64 array: each step copies only the tokens added
    since the last one (token ids are only ever appended), not the whole history."""

    __slots__ = ("buf", "n")

    def __init__(self) -> None:
        self.buf = np.empty(256, dtype=np.int64)
        self.n = 0

    def view(self, tokens: Sequence[int]) -> np.ndarray:
        length = len(tokens)
        if length < self.n:  # not an extension of what was seen: start over
            self.n = 0
        if length > self.buf.shape[0]:
            grown = np.empty(max(length, 2 * self.buf.shape[0]), dtype=np.int64)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        if length > self.n:
            self.buf[self.n : length] = tokens[self.n : length]
            self.n = length
        return self.buf[:length]


def propose_ngram(tokens: Sequence[int], n_min: int, n_max: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n
    tokens, trying n = n_max down to n_min; [] when none occurs."""
    length = len(tokens)
    if k < 1 or length < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        pattern = arr[length - n :]
        # Windows that start at 0 .. length - 1 - n: each is followed by at least one token.
        windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start : start + k].tolist()
    return []


def can_speculate(params, num_output_tokens: int) -> bool:
    """Whether a request's next tokens may be verified from drafts: nothing but the logits,
    temperature and top-k / top-p / min-p decides them."""
    return (
        params.n == 1
        and not params.needs_penalties
        and not params.changes_logits
        and num_output_tokens >= params.min_tokens
    )


def verify(
    logits: torch.Tensor,
    draft: Sequence[int],
    params,
    step_index: int,
    generator: torch.Generator | None,
) -> list[int]:
    """The tokens a step emits for one sequence: logits [len(draft) + 1, vocab] (row j is the
    distribution after the last token and drafts[:j]); the accepted drafts, then one token of
    the target's (a correction or the bonus). step_index: the sequence's output count before
    the step (seeded requests draw from (seed, step_index)); generator: the shared one for
    unseeded random rows."""
    k = len(draft)
    if params.is_greedy:
        target = argmax_rows(logits).tolist()
        out = []
        for j in range(k):
            if target[j] != draft[j]:
                break
            out.append(draft[j])
        out.append(target[len(out)])
        return out
    x = logits.float() / params.temperature
    if params.min_p > 0:
        x = apply_min_p(x, torch.full((k + 1,), params.min_p, device=x.device))
    if params.top_k != -1 or params.top_p < 1.0:
        vocab = x.shape[-1]
        top_k = None
        if params.top_k != -1:
            top_k = torch.full((k + 1,), min(params.top_k, vocab), device=x.device)
        top_p = None
        if params.top_p < 1.0:
            top_p = torch.full((k + 1,), params.top_p, device=x.device)
        x = apply_top_k_top_p(x, top_k, top_p)
    probs = torch.softmax(x, dim=-1)
    if params.seed is not None:
        generator = torch.Generator(device=probs.device)
        generator.manual_seed(step_seed(params.seed, step_index))
    # All random numbers at once: u for the acceptance tests, q ~ Exp(1) for the tokens drawn
    # (argmax(p / q) picks token t with probability p_t), one row per position.
    u = torch.rand(k, generator=generator, device=probs.device)
    q = torch.empty_like(probs).exponential_(generator=generator)
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    ids = torch.tensor(list(draft), dtype=torch.int64, device=probs.device)
    p_draft = probs[:-1].gather(1, ids[:, None]).squeeze(1) if k else probs.new_zeros(0)
    residual = probs.clone()
    if k:  # rejected at j: sample from p_j without the draft token
        residual[torch.arange(k, device=probs.device), ids] = 0.0
    picks = (residual / q).argmax(dim=-1)
    accepted = (u < p_draft).tolist()
    picks = picks.tolist()
    out = []
    for j in range(k):
        if not accepted[j]:
            return [*out, picks[j]]
        out.append(draft[j])
    # Every draft accepted: the bonus from the full distribution of the last row (its residual
    # row is untouched).
    return [*out, picks[k]]
