"""Beam search over the engine (vLLM's `LLM.beam_search`): each step asks the engine for one token
of every live beam with its 2 x beam_width most likely next tokens (raw logprobs), keeps the
beam_width best extensions by score, and sets aside those that ended (EOS, unless ignore_eos).
The beams of a prompt share its prefix in the KV cache (prefix caching), so a step computes
about one block per beam.

Score: cumulative logprob / (generated tokens ** length_penalty), the final EOS not counted (the
Hugging Face convention; vLLM counts the prompt's tokens too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.outputs import Logprob


@dataclass
class BeamSearchParams:
    """vLLM's fields. beam_width: beams kept per step and sequences returned; max_tokens:
    tokens generated at most; ignore_eos: EOS is an ordinary token; length_penalty: the exponent
    of the length the score divides by (> 1 favours longer sequences)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.temperature != 0.0:
            raise ValueError(
                f"beam search ranks the model's own logprobs: temperature must be 0, got "
                f"{self.temperature!r}"
            )
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")


@dataclass
class BeamSearchSequence:
    """One beam: `tokens` the prompt's then the generated ones (vLLM's shape), `logprobs` one
    entry per generated token (the token and the step's alternatives)."""

    tokens: list[int]
    num_prompt_tokens: int
    cum_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]

    def score(self, length_penalty: float, eos_ids: frozenset[int]) -> float:
        n = len(self.tokens) - self.num_prompt_tokens
        if self.finish_reason == "stop" and self.tokens[-1] in eos_ids:
            n -= 1
        return self.cum_logprob / (max(n, 1) ** length_penalty)


@dataclass
class BeamSearchOutput:
    """A prompt's best sequences, best first."""

    sequences: list[BeamSearchSequence]


def extend(
    beams: list[BeamSearchSequence],
    steps: list[dict[int, Logprob]],
    params: BeamSearchParams,
    eos_ids: frozenset[int],
) -> tuple[list[BeamSearchSequence], list[BeamSearchSequence]]:
    """One step: each beam with its step's top logprobs (token -> logprob) -> (the beams that go
    on, the ones that ended). The beam_width best extensions by score are kept; of those, the
    ones ending in EOS (not ignored) or reaching max_tokens end. Ties keep the earlier beam and
    the likelier token first (stable order)."""
    candidates = []
    for beam, top in zip(beams, steps, strict=True):
        ranked = sorted(top.items(), key=lambda kv: -float(kv[1]))[: 2 * params.beam_width]
        for token, lp in ranked:
            tokens = [*beam.tokens, token]
            seq = BeamSearchSequence(
                tokens, beam.num_prompt_tokens, beam.cum_logprob + float(lp), [*beam.logprobs, top]
            )
            if token in eos_ids and not params.ignore_eos:
                seq.finish_reason = "stop"
            elif len(seq.output_token_ids) >= params.max_tokens:
                seq.finish_reason = "length"
            candidates.append(seq)
    candidates.sort(key=lambda s: -s.score(params.length_penalty, eos_ids))
    kept = candidates[: params.beam_width]
    return [s for s in kept if s.finish_reason is None], [s for s in kept if s.finish_reason]
