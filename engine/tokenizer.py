"""Tokenizers for Hugging Face folders and GGUF files, and chat-template rendering to token ids."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hal.errors import HalError

logger = logging.getLogger(__name__)


class TokenizerLoadError(HalError):
    """No usable tokenizer next to the weights."""


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Any:
    """A transformers fast tokenizer for a model folder or a .gguf file.

    A GGUF's vocabulary, merges and special tokens come from its metadata (transformers converts
    them); `chat_template` (e.g. the GGUF's `tokenizer.chat_template`) is set when the tokenizer
    has none.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        if path.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises OSError/ValueError/KeyError variously
        raise TokenizerLoadError(
            f"{path}: no usable tokenizer (need tokenizer.json or tokenizer_config.json, or GGUF "
            f"tokenizer metadata): {e}"
        ) from e
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    return tokenizer


def load_chat_template(value: str | Path | None) -> str | None:
    """A chat template given by the user (vLLM's --chat-template): a file's text, or the value
    itself when it is a Jinja template; None stays None. A value that is neither (a path that does
    not exist) is a ValueError."""
    if value is None:
        return None
    text = str(value)
    path = Path(text)
    if "\n" not in text and len(text) < 4096 and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in text or "{%" in text:
        return text
    raise ValueError(
        f"chat template {text!r} is neither a file that exists nor a Jinja template "
        "(text with {{ ... }} or {% ... %})"
    )


def apply_chat_template(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> list[int]:
    """Render `messages` (and `tools`, OpenAI's function specs, for templates that show them)
    with the tokenizer's chat template (or `chat_template`, a Jinja template's text, instead)
    and return the prompt's token ids. continue_final_message: the last (assistant) message is
    left open for the model to continue (no end-of-turn). template_kwargs: extra variables the
    template reads (vLLM's chat_template_kwargs, e.g. Qwen3's enable_thinking)."""
    if not chat_template and not getattr(tokenizer, "chat_template", None):
        raise TokenizerLoadError(
            "the tokenizer has no chat template; pass a plain prompt instead of messages, or a "
            "template (LLM.chat(chat_template=...), hal serve --chat-template)"
        )
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools,
        continue_final_message=continue_final_message, chat_template=chat_template or None,
        **(template_kwargs or {}),
    )  # fmt: skip
    # The template already writes any BOS/special tokens it wants.
    return list(tokenizer.encode(text, add_special_tokens=False))
