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
    temperature and top-k / top-p / min-p decides them, and a structured-output grammar (each
    drafted row gets its position's mask, `SamplingRow.draft_bitmasks`)."""
    return (
        params.n == 1
        and not params.needs_penalties
        and not params.logit_bias
        and params.allowed_token_ids is None
        and not params.bad_words
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
    return verify_batch(logits, [draft], [params], [step_index], generator)[0]


def verify_batch(
    logits: torch.Tensor,
    drafts: Sequence[Sequence[int]],
    params: Sequence,
    step_indices: Sequence[int],
    generator: torch.Generator | None,
) -> list[list[int]]:
    """`verify` for several sequences at once, with one host transfer: logits holds each
    sequence's len(draft) + 1 rows in turn. Random numbers are drawn sequence by sequence, in
    order (the same ones `verify` draws for each alone, given the same shared generator state)."""
    device = logits.device
    starts, row = [], 0
    for d in drafts:
        starts.append(row)
        row += len(d) + 1
    if row != logits.shape[0]:
        raise ValueError(f"verify: {logits.shape[0]} logits rows for {row} positions")
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    rand = [i for i, p in enumerate(params) if not p.is_greedy]
    target: dict[int, list[int]] = {}
    if greedy:
        rows = [r for i in greedy for r in range(starts[i], starts[i] + len(drafts[i]) + 1)]
        picked = argmax_rows(logits[rows] if len(rows) < row else logits).tolist()
        at = 0
        for i in greedy:
            n = len(drafts[i]) + 1
            target[i] = picked[at : at + n]
            at += n
    accept: dict[int, list[bool]] = {}
    if rand:
        rows = [r for i in rand for r in range(starts[i], starts[i] + len(drafts[i]) + 1)]
        each = [params[i] for i in rand for _ in range(len(drafts[i]) + 1)]
        x = (
            logits[rows].float()
            / torch.tensor([p.temperature for p in each], device=device)[:, None]
        )
        if any(p.min_p > 0 for p in each):
            x = apply_min_p(x, torch.tensor([p.min_p for p in each], device=device))
        if any(p.top_k != -1 or p.top_p < 1.0 for p in each):
            vocab = x.shape[-1]
            top_k = top_p = None
            if any(p.top_k != -1 for p in each):
                ks = [vocab if p.top_k == -1 else min(p.top_k, vocab) for p in each]
                top_k = torch.tensor(ks, device=device)
            if any(p.top_p < 1.0 for p in each):
                top_p = torch.tensor([p.top_p for p in each], device=device)
            x = apply_top_k_top_p(x, top_k, top_p)
        probs = torch.softmax(x, dim=-1)
        # Per sequence, in order: u for the acceptance tests, q ~ Exp(1) per position for the
        # token drawn (argmax(p / q) picks token t with probability p_t).
        us, qs = [], []
        for i in rand:
            k = len(drafts[i])
            g = generator
            if params[i].seed is not None:
                g = torch.Generator(device=device)
                g.manual_seed(step_seed(params[i].seed, step_indices[i]))
            us.append(torch.rand(k, generator=g, device=device))
            qs.append(torch.empty(k + 1, probs.shape[-1], device=device).exponential_(generator=g))
        q = torch.cat(qs).clamp_min_(torch.finfo(probs.dtype).tiny)
        u = torch.cat(us)
        # The draft token of every position but each sequence's last (the bonus row).
        ids, draft_rows = [], []
        at = 0
        for i in rand:
            k = len(drafts[i])
            ids += list(drafts[i])
            draft_rows += range(at, at + k)
            at += k + 1
        ids_t = torch.tensor(ids, dtype=torch.int64, device=device)
        rows_t = torch.tensor(draft_rows, dtype=torch.int64, device=device)
        residual = probs.clone()
        if ids:  # rejected at j: sample from p_j without the draft token
            p_draft = probs[rows_t, ids_t]
            residual[rows_t, ids_t] = 0.0
            accepted = (u < p_draft).tolist()
        else:
            accepted = []
        picks = (residual / q).argmax(dim=-1).tolist()
        at = ad = 0
        for i in rand:
            k = len(drafts[i])
            target[i] = picks[at : at + k + 1]
            accept[i] = accepted[ad : ad + k]
            at += k + 1
            ad += k
    out = []
    for i, draft in enumerate(drafts):
        t, tokens = target[i], []
        for j, d in enumerate(draft):
            ok = accept[i][j] if i in accept else t[j] == d
            if not ok:
                break
            tokens.append(d)
        tokens.append(t[len(tokens)])  # the correction, or the bonus after all drafts
        out.append(tokens)
    return out
