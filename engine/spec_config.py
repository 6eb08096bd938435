"""The speculative-decoding configuration (vLLM's speculative_config), without torch: the
engine's config and the command line read it; engine/spec_decode.py does the work."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's speculative_config for the n-gram method: num_speculative_tokens (k) drafts at most
    per step, matched on the last prompt_lookup_min..prompt_lookup_max tokens."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 4
    # 2: a one-token match drafts too often where little repeats (the default SmolLM2 on the
    # CPU, story prompts, k = 4: 0.65x plain decoding with 1, 0.89x with 2; copying 2.04x / 1.93x)
    prompt_lookup_min: int = 2
    # vLLM's disable_by_batch_size: no drafts while at least this many sequences run (None: no
    # limit). Drafts pay where a step's extra tokens are cheap: batch 1 on the CPU (the C path
    # takes up to 8 rows) or a memory-bound GPU step; at batch 4 on 2 CPU cores they cost more
    # than they save (0.9x plain decoding on the copy workload).
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"speculative_config method {self.method!r} is not supported; this engine has "
                f"{', '.join(METHODS)} (proposals from the sequence's own n-grams, no draft model)"
            )
        names = ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                 "disable_by_batch_size")  # fmt: skip
        for name in names:
            v = getattr(self, name)
            if name == "disable_by_batch_size" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"speculative_config {name} must be an integer >= 1, got {v!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config prompt_lookup_min={self.prompt_lookup_min} exceeds "
                f"prompt_lookup_max={self.prompt_lookup_max}"
            )

    @classmethod
    def parse(cls, value) -> SpeculativeConfig | None:
        """None, a SpeculativeConfig, or vLLM's dict form ({"method": "ngram", ...})."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(
                f"speculative_config must be a dict like {{'method': 'ngram', "
                f"'num_speculative_tokens': 3}}, got {type(value).__name__}"
            )
        unknown = set(value) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(
                f"speculative_config: unknown keys {sorted(unknown)}; this engine takes "
                f"{', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**value)

    def describe(self) -> str:
        return (
            f"speculative decoding: {self.method}, up to {self.num_speculative_tokens} draft "
            f"tokens a step (lookup {self.prompt_lookup_min}..{self.prompt_lookup_max} tokens"
            + (
                ""
                if self.disable_by_batch_size is None
                else f"; none from {self.disable_by_batch_size} running sequences"
            )  # fmt: skip
            + ")"
        )


def add_speculative_arg(parser: argparse.ArgumentParser) -> None:
    """`--speculative-config JSON` (vLLM's flag) on `hal generate` and `hal serve`."""
    parser.add_argument(
        "--speculative-config",
        type=speculative_arg,
        default=None,
        help='speculative decoding, as JSON (vLLM\'s flag): \'{"method": "ngram", '
        '"num_speculative_tokens": 3}\'',
    )


def speculative_arg(text: str) -> dict:
    """The --speculative-config command-line value: a JSON object (argparse reports a
    ValueError's message as a usage error)."""
    from engine.argtypes import json_option

    example = '{"method": "ngram", "num_speculative_tokens": 3}'

    def checked(value):
        SpeculativeConfig.parse(value)
        return value

    return json_option(text, checked, example)
