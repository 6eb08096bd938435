"""The OpenAI wire format: request models (pydantic, OpenAI field names), their mapping to
`SamplingParams`, the error shape, and the logprobs and usage objects of responses.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.detokenizer import TokenText
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutputsParams

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI allows 5 for completions, 20 for chat)
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default

# Fields OpenAI clients may send that change nothing here; accepted without a warning.
_IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


class OpenAIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code=None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions, plus the engine's extra ones."""

    model_config = ConfigDict(extra="allow")

    # Optional as in vLLM: a request without one goes to the served model.
    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # The engine's extras (vLLM's names).
    top_k: int | None = None
    # None: the model's generation_config.json default, else SamplingParams' (vLLM's rule, as for
    # temperature, top_p and top_k)
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    priority: int = 0  # lower runs first (a server started with --scheduling-policy priority)
    # vLLM's: the top-k logprobs of every prompt token, in the response's `prompt_logprobs`
    prompt_logprobs: int | None = None
    # vLLM's: the prompt's and each choice's token ids in the response (and stream chunks)
    return_token_ids: bool = False
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: the room)
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs object, and vLLM's
    # older guided_* fields (one of them per request).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def warn_unknown_fields(self) -> None:
        unknown = set(self.model_extra or {}) - _IGNORED_FIELDS
        if unknown:
            logger.warning("ignoring unknown request fields: %s", ", ".join(sorted(unknown)))

    def check_common(self) -> None:
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise bad_request(
                    f"logit_bias keys must be token ids (decimal strings), got {key!r}",
                    "logit_bias",
                )
            if not -100 <= bias <= 100:
                raise bad_request(
                    f"logit_bias values must be in [-100, 100], got {bias} for token {key}",
                    "logit_bias",
                )
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        if self.prompt_logprobs is not None:
            if not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
                raise bad_request(
                    f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}",
                    "prompt_logprobs",
                )
            if self.stream:
                raise bad_request(
                    "prompt_logprobs is not available with stream=true", "prompt_logprobs"
                )
        self.structured()

    def structured(self) -> StructuredOutputsParams | None:
        """The request's output constraint, from whichever one field gives it; a 400 naming the
        field for a malformed one or for more than one."""
        given: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                given.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise bad_request(
                        "response_format json_schema needs json_schema.schema, a JSON schema "
                        "object", "response_format",
                    )  # fmt: skip
                given.append(("response_format", {"json": spec["schema"]}))
            elif kind not in (None, "text"):
                raise bad_request(
                    f"response_format type must be text, json_object or json_schema, got {kind!r}",
                    "response_format",
                )
        if self.structured_outputs is not None:
            given.append(("structured_outputs", self.structured_outputs))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                          ("guided_choice", "choice"), ("guided_grammar", "grammar")):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                given.append((name, {key: value}))
        if not given:
            return None
        if len(given) > 1:
            names = ", ".join(name for name, _ in given)
            raise bad_request(f"give one output constraint, got {names}", given[1][0])
        name, spec = given[0]
        try:
            return StructuredOutputsParams.from_dict(spec)
        except (ValueError, TypeError) as e:
            raise bad_request(f"{name}: {e}", name) from e

    def to_sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> SamplingParams:
        """SamplingParams for this request; a bad value is a 400 naming the field. defaults:
        the model's generation_config.json values for the sampling fields the request leaves
        out (`engine.generation_config`)."""
        d = defaults or {}

        def given(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else d.get(name, fallback)

        try:
            return SamplingParams(
                n=self.n,
                temperature=given("temperature", 1.0),
                top_p=given("top_p", 1.0),
                top_k=given("top_k", -1),
                min_p=given("min_p", 0.0),
                repetition_penalty=given("repetition_penalty", 1.0),
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                seed=self.seed,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                logit_bias={int(k): v for k, v in self.logit_bias.items()}
                if self.logit_bias
                else None,
                allowed_token_ids=self.allowed_token_ids,
                bad_words=self.bad_words,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                structured_outputs=self.structured(),
                truncate_prompt_tokens=self.truncate_prompt_tokens,
            )
        except ValueError as e:
            param = str(e).split(" ", 1)[0]
            raise bad_request(str(e), param if param in type(self).model_fields else None) from e


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str | list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise bad_request("suffix is not supported by this server", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(
                f"best_of must equal n ({self.n}) on this server, got {self.best_of}", "best_of"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad_request(
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs"
            )

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) back, nothing generated."""
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: text or token ids each."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: tool calls' JSON arguments as objects (the
        Llama 3.1 and Qwen templates write them with `tojson`), ids and names kept."""
        msg: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                args = call.function.arguments
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        pass  # not JSON: the template gets the text
                fn = {"name": call.function.name, "arguments": args}
                calls.append({"id": call.id, "type": "function", "function": fn})
            msg["tool_calls"] = calls
        return msg


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's: the model continues the last message
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: e.g. {"enable_thinking": false}
    chat_template: str | None = None  # vLLM's: a Jinja template for this request only
    tools: list[ToolSpec] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def check(self) -> None:
        self.check_common()
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise bad_request(
                    "continue_final_message needs add_generation_prompt=false (the last message "
                    "is continued, no new turn opened)", "continue_final_message",
                )  # fmt: skip
            if self.messages[-1].role != "assistant":
                raise bad_request(
                    "continue_final_message needs the last message to be the assistant's, got "
                    f"{self.messages[-1].role!r}", "continue_final_message",
                )  # fmt: skip
        reserved = {"messages", "tools", "add_generation_prompt", "continue_final_message",
                    "tokenize"} & set(self.chat_template_kwargs or {})  # fmt: skip
        if reserved:
            raise bad_request(
                f"chat_template_kwargs may not set {sorted(reserved)}: they are request fields",
                "chat_template_kwargs",
            )
        self.tool_mode(auto_parser=True)  # shape checks; the server's own rule comes later
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(
                    f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                    "top_logprobs",
                )

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template takes them (None without tools)."""
        if not self.tools:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def tool_mode(self, auto_parser: bool) -> tuple[str | None, dict[str, Any] | None]:
        """(mode, named tool): mode None (no tools), "none", "auto", "required" or "named";
        auto_parser: the server parses free-form calls. A 400 for a choice that does not fit."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none"):
                raise bad_request("tool_choice needs tools", "tool_choice")
            return None, None
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise bad_request(f"tools must have distinct names, got {names}", "tools")
        if choice is None:
            return ("auto" if auto_parser else "none"), None
        if isinstance(choice, dict):
            fn = choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            if choice.get("type") != "function" or not isinstance(name, str):
                raise bad_request(
                    'tool_choice must be "none", "auto", "required" or {"type": "function", '
                    '"function": {"name": ...}}', "tool_choice",
                )  # fmt: skip
            if name not in names:
                raise bad_request(f"tool_choice names {name!r}, not one of the tools {names}",
                                  "tool_choice")  # fmt: skip
            mode, tool = "named", self.tools[names.index(name)].model_dump(exclude_none=True)
        elif choice in ("none", "auto", "required"):
            mode, tool = choice, None
        else:
            raise bad_request(
                f'tool_choice must be "none", "auto", "required" or a named function, got '
                f"{choice!r}", "tool_choice",
            )  # fmt: skip
        if mode == "auto" and not auto_parser:
            raise bad_request(
                'tool_choice "auto" needs a server started with --enable-auto-tool-choice and '
                '--tool-call-parser (hermes or llama3_json); "required" or a named function '
                "work on any model", "tool_choice",
            )  # fmt: skip
        if mode in ("named", "required") and self.structured() is not None:
            raise bad_request(
                f"tool_choice {mode!r} constrains the output itself: leave out response_format "
                "and the structured_outputs / guided_* fields", "tool_choice",
            )  # fmt: skip
        return mode, tool


class EmbeddingRequest(BaseModel):
    """OpenAI's /v1/embeddings body: input text(s) or token ids."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None  # keep each input's last k tokens (-1: the room)
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        x = self.input
        if isinstance(x, str):
            return [x]
        if not x:
            raise bad_request("input is empty", "input")
        if all(isinstance(t, int) for t in x):
            return [list(x)]  # type: ignore[list-item]
        return list(x)  # type: ignore[arg-type]


class ScoreRequest(BaseModel):
    """vLLM's /score body: text_1 against text_2 (one against many, or pair by pair)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    text_1: str | list[str] | list[int] | list[list[int]]
    text_2: str | list[str] | list[int] | list[list[int]]


class RerankRequest(BaseModel):
    """The Jina / Cohere rerank body vLLM serves at /rerank, /v1/rerank and /v2/rerank."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    query: str
    documents: list[str] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's /v1/load_lora_adapter: serve the PEFT adapter at lora_path as model lora_name."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's /v1/unload_lora_adapter (lora_int_id, when given, must be the adapter's)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body; malformed JSON or a wrong field is a 400 naming the field."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise bad_request(f"malformed JSON body: {err['msg']}") from e
        if err["type"] == "model_type" and not err["loc"]:
            raise bad_request(f"the request body must be a JSON object: {err['msg']}") from e
        param = _error_param(err["loc"])
        if err["type"] == "missing":
            raise bad_request(f"{param}: this field is required", param) from e
        raise bad_request(f"{param}: {err['msg']} (got {err.get('input')!r})", param) from e


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _error_param(loc: tuple) -> str:
    """'messages.0.role' from pydantic's location, without union member tags like 'list[int]'."""
    parts = [str(x) for x in loc if not (isinstance(x, str) and ("[" in x or x in _TYPE_TAGS))]
    return ".".join(parts)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens: prompt tokens the prefix
    cache served."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _sorted_top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[: max(k, 0)]


def completion_logprobs(
    c: CompletionOutput, start: int, end: int, k: int, token_text: TokenText, text_offset: int
) -> dict[str, Any]:
    """Completions `logprobs` for tokens [start, end): tokens, token_logprobs, top_logprobs
    (the top-k plus the chosen token), text_offset (from `text_offset` on)."""
    logprobs = c.logprobs or []
    end = min(end, len(logprobs))
    return _logprob_lists(c.token_ids[start:end], logprobs[start:end], k, token_text, text_offset)


def prompt_completion_logprobs(out: RequestOutput, k: int, token_text: TokenText) -> dict:
    """The echoed prompt's part of completions `logprobs` (text offsets from 0): its first
    token has no logprob (null, as OpenAI and vLLM answer)."""
    return _logprob_lists(out.prompt_token_ids, out.prompt_logprobs or [], k, token_text, 0)


def prompt_logprobs_field(out: RequestOutput, k: int) -> list[dict[str, dict] | None]:
    """vLLM's `prompt_logprobs` response field: per prompt position None (the first) or token id
    -> {"logprob", "rank", "decoded_token"} for the k most likely tokens and the prompt's own."""
    result: list[dict[str, dict] | None] = []
    for token_id, entry in zip(out.prompt_token_ids, out.prompt_logprobs or [], strict=False):
        if entry is None:
            result.append(None)
            continue
        keep = dict(_sorted_top(entry, k))
        keep[token_id] = entry[token_id]
        result.append({
            str(t): {"logprob": float(entry[t]), "rank": getattr(entry[t], "rank", None),
                     "decoded_token": getattr(entry[t], "decoded_token", None)}
            for t in keep
        })  # fmt: skip
    return result


def join_logprobs(first: dict[str, list], then: dict[str, list]) -> dict[str, list]:
    return {key: first[key] + then[key] for key in first}


def _logprob_lists(token_ids, entries, k: int, token_text: TokenText, text_offset: int) -> dict:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = token_text(token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if entry is None:  # the prompt's first token
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(entry.get(token_id))
        # Keyed by text (OpenAI's shape): tokens that decode alike keep the highest logprob.
        top: dict[str, float] = {}
        for t, lp in _sorted_top(entry, k):
            top.setdefault(token_text(t), lp)
        top.setdefault(text, entry[token_id])
        tops.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(
    c: CompletionOutput, start: int, end: int, k: int, token_text: TokenText
) -> dict[str, Any]:
    """Chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    content = []
    logprobs = c.logprobs or []
    for i in range(start, min(end, len(logprobs))):
        token_id = c.token_ids[i]
        entry = logprobs[i]
        text = token_text(token_id)
        content.append(
            {
                "token": text,
                "logprob": entry.get(token_id),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode())}
                    for t, lp in _sorted_top(entry, k)
                ],
            }
        )
    return {"content": content}
