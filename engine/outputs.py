"""What `LLM.generate` returns: vLLM's shapes, so users' code ports."""

from __future__ import annotations

from dataclasses import dataclass, field


class Logprob(float):
    """A token's log-probability in `CompletionOutput.logprobs`: the float itself, and vLLM's
    `Logprob` fields, so both `entry[t] < -1.0` and `entry[t].logprob` work: `rank` (1 = the most
    likely token of the step's distribution; the chosen token's rank counts every token strictly
    more likely, so it may exceed the top-k shown) and `decoded_token` (the token's text decoded
    alone; None without a tokenizer)."""

    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob: float, rank: int | None = None, decoded_token: str | None = None):
        self = super().__new__(cls, logprob)
        self.rank, self.decoded_token = rank, decoded_token
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    def __reduce__(self):
        return (Logprob, (float(self), self.rank, self.decoded_token))

    def __str__(self) -> str:  # the number, as for any float
        return float.__repr__(self)

    def __repr__(self) -> str:
        return (f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, "
                f"decoded_token={self.decoded_token!r})")  # fmt: skip


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with n > 1 has n of these)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    # per step: token id -> its Logprob (a float; the chosen token and the top-k alternatives)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock timing of one request, in seconds since the epoch."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """The outputs of one request (`.outputs[i].text`, `.outputs[i].token_ids`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # With SamplingParams.prompt_logprobs: per prompt position, None for the first token, then
    # token id -> Logprob for that prompt token and the k most likely ones (vLLM's shape).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
