"""Requests and their sequences: token ids, computed-token progress and lifecycle status.

A request starts with one sequence; with n > 1 it forks into n once its prompt is computed.
"""

from __future__ import annotations

import enum
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; waits to recompute prompt + output
    SWAPPED = "swapped"  # blocks in the CPU swap pool; waits to swap back in
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    def __init__(self, value: str) -> None:
        # A plain attribute, not a property over a set: read per sequence per step, and an
        # enum's hash runs in Python.
        self.is_finished: bool = value.startswith("finished")


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


class Sequence:
    """One token stream. The scheduler's one rule: num_computed_tokens catches up to num_tokens.

    block_hashes: the hash chain of this sequence's full blocks of token ids, filled lazily by the
    KV-cache manager (token ids only ever grow, so entries stay valid, preemption included).
    """

    def __init__(self, seq_id: int, request: Request, token_ids: list[int], index: int = 0) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index  # which of the request's n outputs
        self.token_ids = token_ids
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None  # the stop token or string, set by the caller
        self.block_hashes: list[bytes] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def output_token_ids(self) -> list[int]:
        """A copy of the output tokens (O(length): per-token code uses num_output_tokens and
        last_token_id instead)."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """'stop', 'length' or 'abort' once finished, else None."""
        return _FINISH_REASONS.get(self.status)

    @property
    def priority(self) -> tuple[int, int, int]:
        """Scheduling order: the request's priority (lower first; always 0 under FCFS), then
        earlier requests first, then output index."""
        return (self.request.priority, self.request.arrival_index, self.index)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request.request_id!r}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, {self.status.name})"
        )


class Request:
    """A prompt and its sampling parameters (opaque here except .n and .max_tokens).

    arrival_index is set by the scheduler on add_request; seqs is filled by the scheduler.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: Any,
        arrival_time: float = 0.0,
        priority: int = 0,
        lora_request: Any = None,
    ) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if len(prompt_token_ids) == 0:
            raise ValueError(f"request {request_id!r}: prompt_token_ids must not be empty")
        for t in prompt_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(
                    f"request {request_id!r}: token ids must be integers >= 0, got {t!r}"
                )
        n = sampling_params.n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"request {request_id!r}: n must be an integer >= 1, got {n!r}")
        max_tokens = sampling_params.max_tokens
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            raise ValueError(
                f"request {request_id!r}: max_tokens must be an integer >= 1 or None, "
                f"got {max_tokens!r}"
            )
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(
                f"request {request_id!r}: priority must be an integer, got {priority!r}"
            )
        self.priority = priority  # lower runs first (scheduling_policy "priority")
        # The LoRA adapter the request runs through (an engine.lora.LoRARequest), None for the
        # base model; its prefix-cache keys start from cache_salt, so no block is shared across
        # adapters.
        self.lora_request = lora_request
        self.lora_int_id = None if lora_request is None else lora_request.lora_int_id
        self.cache_salt = None if lora_request is None else b"lora:%d" % self.lora_int_id
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = arrival_time
        self.arrival_index = -1
        self.seqs: list[Sequence] = []
        self.is_forked = False  # True once the n outputs exist (n == 1: after the first token)
        self.num_cached_tokens: int | None = None  # prefix-cache hits at its first admission

    @property
    def n(self) -> int:
        return self.sampling_params.n

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens

    @property
    def is_finished(self) -> bool:
        seqs = self.seqs
        if len(seqs) == 1:
            return seqs[0].status.is_finished
        return bool(seqs) and all(s.status.is_finished for s in seqs)

    def __repr__(self) -> str:
        return f"Request(id={self.request_id!r}, prompt={len(self.prompt_token_ids)}, n={self.n})"
