"""Embeddings from decoder models (vLLM's pooling runner: `LLM(model, runner="pooling")`,
`LLM.embed`, the server's /v1/embeddings).

A pooling engine runs prompts only: each request's prompt is prefilled (in chunks, like any
prompt) and the final hidden state of its last token (after the model's final norm) is its
embedding: last-token pooling, what decoder embedding models (Qwen3-Embedding, gte-Qwen2,
e5-mistral, SFR-Embedding) are trained for. The step returns those hidden rows instead of logits
(in-process, or from a parallel engine's output rank); the request then finishes. Normalization
(L2, on by default) and Matryoshka truncation (`dimensions`: the first d values, normalized
after) are per request. A sentence-transformers folder's pooling config is read: a pooling mode
other than last-token is refused with what it asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

RUNNERS = ("generate", "pooling")


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
class PoolingConfig:
    """The model's pooling: always last-token here; normalize its default."""

    normalize: bool = True

    @classmethod
    def from_model(cls, model: str | None) -> PoolingConfig:
        """Read a sentence-transformers folder's `modules.json` / pooling config (none: last
        token, normalized). A pooling mode this engine does not run is a ValueError."""
        if model is None or not Path(model).is_dir():
            return cls()
        folder = Path(model)
        modules = folder / "modules.json"
        if not modules.is_file():
            return cls()
        entries = json.loads(modules.read_text())
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in entries)
        for m in entries:
            if not str(m.get("type", "")).endswith("Pooling"):
                continue
            cfg_path = folder / m.get("path", "") / "config.json"
            if not cfg_path.is_file():
                continue
            cfg = json.loads(cfg_path.read_text())
            modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v is True]
            if modes and modes != ["pooling_mode_lasttoken"]:
                raise ValueError(
                    f"{cfg_path}: pooling {', '.join(modes)} is not supported; this engine pools "
                    "the last token (pooling_mode_lasttoken)"
                )
        return cls(normalize=normalize)


def finish_embedding(
    hidden: torch.Tensor, params: PoolingParams, config: PoolingConfig
) -> list[float]:
    """One sequence's embedding from its last token's final hidden state (fp32 [hidden])."""
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
