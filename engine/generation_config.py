"""vLLM's `generation_config`: default sampling parameters from the model's generation_config.json.

Model creators ship recommended sampling settings there (Qwen: temperature 0.7, top_p 0.8, top_k
20, repetition_penalty 1.05). As vLLM does, an engine reads them by default ("auto") and uses
them wherever a request does not say: `LLM.generate` / `chat` without SamplingParams take
`LLM.get_default_sampling_params()`, and the server fills the fields a request leaves out.
"vllm" ignores the file (SamplingParams' own defaults); a folder reads that folder's file
instead. `override_generation_config` ({"temperature": 0.5, ...}) goes on top of either.

Only these keys are used, as in vLLM: repetition_penalty, temperature, top_k, top_p, min_p and
max_new_tokens (a request's default max_tokens). A .gguf model, or a folder without the file,
has none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

FIELDS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")
FILE = "generation_config.json"


def check_generation_config(value: object) -> str:
    """generation_config: "auto", "vllm" or a folder with a generation_config.json, else a
    ValueError."""
    if value in ("auto", "vllm"):
        return value  # type: ignore[return-value]
    if isinstance(value, str | Path) and (Path(value) / FILE).is_file():
        return str(value)
    raise ValueError(
        f"generation_config must be 'auto' (the model's {FILE}), 'vllm' (none) or a folder "
        f"holding a {FILE}, got {value!r}"
    )


def check_overrides(value: object) -> dict[str, Any] | None:
    """override_generation_config: None or a dict of the used keys (others are an error)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"override_generation_config must be a dict, got {value!r}")
    unknown = sorted(set(value) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"override_generation_config: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(FIELDS)}"
        )
    return dict(value)


def _as_params(values: dict[str, Any]) -> dict[str, Any]:
    """Generation-config keys as SamplingParams keywords (max_new_tokens is max_tokens)."""
    out = dict(values)
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    return out


def override_generation_config_arg(text: str) -> dict[str, Any]:
    """The --override-generation-config command-line value: a JSON object of the used keys."""
    from engine.argtypes import json_option

    return json_option(text, check_overrides, '{"temperature": 0.5}')


def sampling_defaults(
    model: str | None, generation_config: str = "auto", overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """SamplingParams keyword defaults for an engine serving `model` (max_new_tokens becomes
    max_tokens); {} when there are none. A value SamplingParams refuses is a ValueError naming
    where it came from."""
    generation_config = check_generation_config(generation_config)
    overrides = check_overrides(overrides)
    source = None
    if generation_config == "auto":
        if model is not None and (Path(model) / FILE).is_file():
            source = model
    elif generation_config != "vllm":
        source = generation_config
    found: dict[str, Any] = {}
    if source is not None:
        from transformers import GenerationConfig

        given = GenerationConfig.from_pretrained(source).to_diff_dict()
        found = {k: given[k] for k in FIELDS if given.get(k) is not None}
    file = None if source is None else Path(source) / FILE
    defaults = _as_params({**found, **(overrides or {})})
    checks = (
        (file, _as_params(found)),
        ("override_generation_config", _as_params(overrides or {})),
        (f"{file} with override_generation_config", defaults),
    )
    for where, part in checks:
        try:
            SamplingParams(**part)
        except ValueError as e:
            raise ValueError(f"default sampling parameters from {where}: {e}") from e
    if found:
        logger.info(
            "default sampling parameters from %s: %s (generation_config='vllm' ignores them)",
            file,
            ", ".join(f"{k}={v}" for k, v in sorted(defaults.items())),
        )
    return defaults
