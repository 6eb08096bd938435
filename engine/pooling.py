"""Embeddings from decoder models (vLLM's pooling runner: `LLM(model, runner="pooling")`,
`LLM.embed`, the server's /v1/embeddings).

A pooling engine runs prompts only: each request's prompt is prefilled (in chunks, like any
prompt) and its embedding comes from the final hidden states (after the model's final norm):
- "LAST" (the default): the last token's, what most decoder embedding models (Qwen3-Embedding,
  gte-Qwen2, e5-mistral, SFR-Embedding) are trained for; the step returns those rows instead of
  logits;
- "MEAN": the mean over every prompt token (GritLM-style models): each step returns, per
  scheduled sequence, the fp32 sum of its rows, which the engine adds up over the prompt's
  chunks (a prefix-cache hit would skip rows, so a mean-pooling engine runs without prefix
  caching; a preempted prompt starts its sum again).
Rows come in-process, or from a parallel engine's output rank; the request then finishes.
Normalization (L2, on by default) and Matryoshka truncation (`dimensions`: the first d values,
normalized after) are per request. The pooling comes from a sentence-transformers folder's
pooling config (`pooling_mode_lasttoken` / `pooling_mode_mean_tokens`; another mode is refused
with what it asked for), or vLLM's `pooler_config` ({"pooling_type": "MEAN", "normalize": ...})
overrides it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

RUNNERS = ("generate", "pooling")
POOLING_TYPES = ("LAST", "MEAN")
# sentence-transformers' pooling modes this engine runs, and as which pooling type
_ST_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class PoolingParams:
    """vLLM's pooling parameters. normalize: L2-normalize the embedding (None: the model's
    sentence-transformers setting, else True). dimensions: keep the first d values (Matryoshka
    models), normalized after the cut."""

    normalize: bool | None = None
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None  # the prompt's last k tokens (-1: the room)

    def __post_init__(self) -> None:
        from engine.sampling_params import check_truncation

        check_truncation(self.truncate_prompt_tokens)
        if self.normalize not in (None, True, False):
            raise ValueError(f"normalize must be true, false or None, got {self.normalize!r}")
        if self.dimensions is not None and (not _is_int(self.dimensions) or self.dimensions < 1):
            raise ValueError(f"dimensions must be an integer >= 1, got {self.dimensions!r}")


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """What `LLM.embed` returns per prompt (vLLM's shape): `.outputs.embedding`."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
    prompt: str | None = None
    metrics: object = field(default=None, repr=False)


@dataclass(frozen=True)
class PoolerConfig:
    """vLLM's `pooler_config`: overrides the model's pooling. pooling_type: "LAST" or "MEAN"
    (any case; None: the model's sentence-transformers setting, else LAST); normalize: the
    default of requests that leave PoolingParams.normalize unset (None: the model's)."""

    pooling_type: str | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        kind = self.pooling_type
        if kind is not None:
            if not isinstance(kind, str) or kind.upper() not in POOLING_TYPES:
                raise ValueError(
                    f"pooler_config.pooling_type must be one of {', '.join(POOLING_TYPES)} or "
                    f"None, got {kind!r}"
                )
            object.__setattr__(self, "pooling_type", kind.upper())
        if self.normalize not in (None, True, False):
            raise ValueError(
                f"pooler_config.normalize must be true, false or None, got {self.normalize!r}"
            )

    @classmethod
    def parse(cls, value: PoolerConfig | dict | None) -> PoolerConfig | None:
        """A PoolerConfig from itself, a dict of its fields (e.g. the CLI's JSON) or None."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"pooler_config must be a dict or PoolerConfig, got {value!r}")
        unknown = sorted(set(value) - {"pooling_type", "normalize"})
        if unknown:
            raise ValueError(
                f"pooler_config: unknown field(s) {', '.join(unknown)}; known: pooling_type, "
                "normalize"
            )
        return cls(**value)


def pooler_config_arg(text: str) -> dict:
    """The --pooler-config command-line value: a JSON object of PoolerConfig's fields."""
    from engine.argtypes import json_option

    example = '{"pooling_type": "MEAN"}'

    def checked(value):
        PoolerConfig.parse(value)
        return value

    return json_option(text, checked, example)


@dataclass(frozen=True)
class PoolingConfig:
    """The engine's pooling: pooling_type ("LAST" or "MEAN") and the normalize default."""

    normalize: bool = True
    pooling_type: str = "LAST"

    @classmethod
    def from_model(cls, model: str | None, override: PoolerConfig | None = None) -> PoolingConfig:
        """Read a sentence-transformers folder's `modules.json` / pooling config (none: last
        token, normalized), then apply `override`'s fields that are set. A pooling mode this
        engine does not run is a ValueError (unless the override names the type)."""
        override = override or PoolerConfig()
        normalize, kind = cls._from_sentence_transformers(model, override.pooling_type is None)
        return cls(
            normalize=normalize if override.normalize is None else override.normalize,
            pooling_type=override.pooling_type or kind,
        )

    @staticmethod
    def _from_sentence_transformers(model: str | None, strict: bool) -> tuple[bool, str]:
        if model is None or not Path(model).is_dir():
            return True, "LAST"
        folder = Path(model)
        modules = folder / "modules.json"
        if not modules.is_file():
            return True, "LAST"
        entries = json.loads(modules.read_text())
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in entries)
        kind = "LAST"
        for m in entries:
            if not str(m.get("type", "")).endswith("Pooling"):
                continue
            cfg_path = folder / m.get("path", "") / "config.json"
            if not cfg_path.is_file():
                continue
            cfg = json.loads(cfg_path.read_text())
            modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v is True]
            if len(modes) == 1 and modes[0] in _ST_MODES:
                kind = _ST_MODES[modes[0]]
            elif modes and strict:
                raise ValueError(
                    f"{cfg_path}: pooling {', '.join(modes)} is not supported; this engine pools "
                    "the last token (pooling_mode_lasttoken) or the mean of all tokens "
                    "(pooling_mode_mean_tokens); pooler_config={'pooling_type': ...} overrides"
                )
        return normalize, kind


def engine_pooling(config) -> PoolingConfig | None:
    """An EngineConfig's pooling: None for a generating engine, else the model's pooling with
    the config's pooler_config applied."""
    if config.runner != "pooling":
        return None
    return PoolingConfig.from_model(config.model, config.pooler_config)


def pooled_rows(hidden: torch.Tensor, batch, pooling_type: str) -> torch.Tensor | None:
    """A pooling step's rows (fp32): LAST: the sampling rows' hidden states (the prompts that
    finish this step; None when none do); MEAN: per scheduled sequence, the sum of its rows."""
    from engine.runner import sampled_rows

    if pooling_type == "MEAN":
        bounds = batch.query_start_loc.tolist()
        rows = [hidden[a:b].float().sum(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return torch.stack(rows) if rows else hidden.new_zeros((0, hidden.shape[-1]))
    if batch.logits_indices.numel() == 0:
        return None
    return sampled_rows(hidden, batch).float()


def finish_embedding(
    hidden: torch.Tensor, params: PoolingParams, config: PoolingConfig
) -> list[float]:
    """One sequence's embedding from its pooled final hidden state (fp32 [hidden])."""
    vec = hidden.float()
    if params.dimensions is not None:
        if params.dimensions > vec.shape[-1]:
            raise ValueError(
                f"dimensions={params.dimensions} exceeds the model's hidden size {vec.shape[-1]}"
            )
        vec = vec[: params.dimensions]
    normalize = config.normalize if params.normalize is None else params.normalize
    if normalize:
        vec = torch.nn.functional.normalize(vec, dim=-1)
    return vec.tolist()


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ScoringRequestOutput:
    """What `LLM.score` returns per pair (vLLM's shape): `.outputs.score`."""

    request_id: str
    outputs: ScoringOutput
    finished: bool = True


def score_pairs(text_1, text_2) -> list[tuple]:
    """vLLM's pairing: one text against one or many (1 -> N), or two lists of the same length
    pair by pair (N -> N). Texts are strings or token-id lists."""

    def as_list(x, name: str) -> list:
        if isinstance(x, str) or (isinstance(x, list) and x and isinstance(x[0], int)):
            return [x]
        if not isinstance(x, list) or not x:
            raise ValueError(f"{name} must be a text, token ids, or a non-empty list of them")
        return list(x)

    a, b = as_list(text_1, "text_1"), as_list(text_2, "text_2")
    if len(a) == 1:
        return [(a[0], t) for t in b]
    if len(a) != len(b):
        raise ValueError(
            f"text_1 has {len(a)} items and text_2 {len(b)}: give one text_1, or as many as "
            "text_2 (pair by pair)"
        )
    return list(zip(a, b, strict=True))


def distinct_texts(pairs: list[tuple]) -> list:
    """Each text of `pairs` once, in first-seen order (token-id lists as tuples): what a score
    request embeds."""
    return list(dict.fromkeys(_text_key(t) for pair in pairs for t in pair))


def pair_scores(pairs: list[tuple], texts: list, embeddings: list[list[float]]) -> list[float]:
    """The cosine similarity of each pair, from the embeddings of `distinct_texts(pairs)`."""
    vec = dict(zip(texts, embeddings, strict=True))
    return [cosine(vec[_text_key(a)], vec[_text_key(b)]) for a, b in pairs]


def _text_key(text):
    return text if isinstance(text, str) else tuple(text)


def cosine(u: list[float], v: list[float]) -> float:
    """The cosine similarity of two embeddings (0 when either is all zeros)."""
    x = torch.tensor(u, dtype=torch.float64)
    y = torch.tensor(v, dtype=torch.float64)
    denom = float(x.norm() * y.norm())
    return float(x @ y) / denom if denom else 0.0
