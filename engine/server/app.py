"""The OpenAI-compatible HTTP app: /v1/models, /v1/completions, /v1/chat/completions (plain JSON
or server-sent events), /health and /metrics, over an `AsyncLLMEngine`.

Every error is OpenAI's {"error": {"message", "type", "param", "code"}} with a fitting status.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import importlib.metadata
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from engine.lora import LoRAError, LoRARequest, load_adapter
from engine.outputs import CompletionOutput, RequestOutput
from engine.pooling import (
    EmbeddingRequestOutput,
    PoolingParams,
    distinct_texts,
    pair_scores,
    score_pairs,
)
from engine.sampling_params import SamplingParams, check_truncation, truncate_prompt
from engine.server.metrics import ServerMetrics
from engine.server.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    OpenAIError,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
    TokenText,
    UnloadLoRAAdapterRequest,
    bad_request,
    chat_logprobs,
    completion_logprobs,
    error_body,
    join_logprobs,
    parse_request,
    prompt_completion_logprobs,
    prompt_logprobs_field,
    usage,
)
from engine.server.reasoning import ReasoningParser, ReasoningStream
from engine.server.tools import (
    TOOL_CALL_PARSERS,
    ToolReply,
    function_schema,
    make_parser,
    required_schema,
)
from engine.structured_output import StructuredOutputsParams
from engine.tokenizer import TokenizerLoadError, apply_chat_template

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS_LIMIT = 4096
DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks that its client is still there


@dataclass
class ServerState:
    """What the routes share: the engine, limits, metrics and the draining flag."""

    engine: AsyncLLMEngine
    model_name: str
    max_body_bytes: int
    max_tokens_limit: int
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    token_text: TokenText = field(init=False)
    tool_parser: str | None = None  # auto tool choice's parser (None: not enabled)
    lora_modules: dict[str, LoRARequest] = field(default_factory=dict)  # served adapters
    lora_ids: int = 0  # the largest lora_int_id handed out
    reasoning: ReasoningParser | None = None  # splits chat replies' thinking off (None: off)

    def __post_init__(self) -> None:
        self.token_text = TokenText(self.engine.tokenizer)

    def begin_drain(self, timeout: float) -> None:
        """Refuse new requests (503); after `timeout` seconds abort the ones still running.
        Call on the server's event loop."""
        if self.draining:
            return
        self.draining = True
        logger.info("draining: %d requests in flight, %.1f s to finish", self.in_flight(), timeout)
        reason = f"server shutting down: not finished within the {timeout:g} s drain timeout"
        asyncio.get_running_loop().call_later(timeout, self.engine.abort_all, reason)

    def in_flight(self) -> int:
        return self.engine.num_unfinished()

    def check_available(self) -> None:
        if self.engine.is_dead:
            raise OpenAIError(503, f"engine unavailable: {self.engine.dead_error}", "server_error")
        if self.draining:
            raise OpenAIError(
                503, "the server is shutting down; retry on another instance", "server_error"
            )

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names (None: the base model, also when not
        given); 404 for a name this server does not serve."""
        if model is None or model == self.model_name:
            return None
        lora = self.lora_modules.get(model)
        if lora is None:
            served = ", ".join(f"`{m}`" for m in (self.model_name, *self.lora_modules))
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist; this server serves {served}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return lora


class _AuthMiddleware:
    """Pure ASGI: every /v1 route needs `Authorization: Bearer <api key>` (401 otherwise)."""

    def __init__(self, app, api_key: str, state: ServerState) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                message = (
                    "Incorrect API key provided"
                    if auth
                    else "Missing API key: send the header 'Authorization: Bearer <key>'"
                )
                self.state.metrics.count_error(401)
                body = error_body(message, "invalid_request_error", None, "invalid_api_key")
                response = JSONResponse(body, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    engine: AsyncLLMEngine,
    served_model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    tool_call_parser: str | None = None,
    enable_auto_tool_choice: bool = False,
    reasoning_parser: str | None = None,
    chat_template: str | None = None,
    cors: dict[str, Any] | None = None,
    lora_modules: dict[str, str] | None = None,
    allow_runtime_lora_updating: bool = False,
) -> FastAPI:
    """The app for `engine`; `api_key` None leaves /v1 open. `app.state.server` is the state.
    enable_auto_tool_choice with tool_call_parser (vLLM's flags): chat requests with tools may
    let the model call them in its own format (`engine.server.tools`). reasoning_parser
    (deepseek_r1, qwen3): chat replies' thinking goes to `reasoning_content`. chat_template:
    a Jinja template's text used instead of the model's. cors: Starlette's CORSMiddleware
    keywords (allow_origins, allow_methods, allow_headers, allow_credentials); None: no CORS
    headers, so browsers on other origins cannot read replies. lora_modules: {name: PEFT
    adapter folder} served as models of their own (vLLM's --lora-modules; the engine needs
    enable_lora), each read and checked here. allow_runtime_lora_updating: vLLM's
    /v1/load_lora_adapter and /v1/unload_lora_adapter routes (off: they do not exist)."""
    for name, value in (("max_body_bytes", max_body_bytes), ("max_tokens_limit", max_tokens_limit)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if tool_call_parser is not None:
        make_parser(tool_call_parser)  # an unknown name fails here
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ValueError(
            f"--enable-auto-tool-choice needs --tool-call-parser ({', '.join(TOOL_CALL_PARSERS)})"
        )
    metrics = ServerMetrics(served_model_name)
    state = ServerState(engine, served_model_name, max_body_bytes, max_tokens_limit, metrics)
    for i, (name, path) in enumerate((lora_modules or {}).items(), start=1):
        if name == served_model_name:
            raise ValueError(f"--lora-modules: {name!r} is the base model's name; rename it")
        lora = LoRARequest(name, i, str(path))
        engine.engine.check_lora_request(lora)  # read and checked before serving
        state.lora_modules[name] = lora
        state.lora_ids = i
    # fields a request leaves out take the model's generation_config.json values (vLLM's)
    defaults = getattr(engine, "default_sampling", None) or {}
    state.tool_parser = tool_call_parser if enable_auto_tool_choice else None
    if reasoning_parser is not None:
        state.reasoning = ReasoningParser(reasoning_parser)
    metrics.observe(engine.stats())
    engine.stats_listener = metrics.observe

    app = FastAPI(title="hal-engine OpenAI-compatible server", docs_url=None, redoc_url=None)
    app.state.server = state
    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key, state=state)
    if cors is not None:
        # Outermost (added last): browsers' preflight OPTIONS requests carry no key and are
        # answered here; the actual requests still need it.
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, **cors)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        metrics.count_error(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        metrics.count_error(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(
            error_body(message, "invalid_request_error", None, code), exc.status_code
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        metrics.count_error(500)
        body = error_body(f"internal server error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_dead:
            return JSONResponse({"status": "dead", "error": str(engine.dead_error)}, 503)
        if state.draining:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def model_card() -> dict[str, Any]:
        return {
            "id": served_model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "hal-engine",
            "max_model_len": engine.max_model_len,
        }

    def chat_ids(
        conversation: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools=None,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        template: str | None = None,
    ) -> list[int]:
        """The conversation (and tools) rendered with the request's chat template, else the
        server's (--chat-template), else the model's; a refusal is a 400."""
        try:
            return apply_chat_template(
                engine.tokenizer, conversation, add_generation_prompt=add_generation_prompt,
                tools=tools, continue_final_message=continue_final_message,
                template_kwargs=template_kwargs, chat_template=template or chat_template,
            )  # fmt: skip
        except TokenizerLoadError as e:
            raise bad_request(str(e), "messages") from e
        except (TemplateError, ValueError, TypeError) as e:  # the template refused the messages
            message = f"the model's chat template rejected the messages: {e}"
            raise bad_request(message, "messages") from e

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": _package_version()}

    def truncated(ids: list[int], k: int | None, param: str) -> list[int]:
        """A prompt cut to its last k tokens (truncate_prompt_tokens); a bad k is a 400."""
        try:
            check_truncation(k)
        except ValueError as e:
            raise bad_request(str(e), "truncate_prompt_tokens") from e
        return truncate_prompt(ids, k, engine.max_model_len)

    async def pooled(inputs: list, params: PoolingParams, prefix: str, what: str, param: str,
                     lora: LoRARequest | None):  # fmt: skip
        """A _Run of one pooling request per input (text or token ids), started (through the
        LoRA adapter `lora`, if any); a text server or an input that encodes to nothing is a
        400."""
        if engine.engine.pooling is None:
            raise bad_request(
                f"this server generates text; {what} need a pooling engine "
                "(hal serve MODEL --runner pooling)", param,
            )  # fmt: skip
        tok = engine.tokenizer
        prompts = [list(tok.encode(x)) if isinstance(x, str) else list(x) for x in inputs]
        k = params.truncate_prompt_tokens
        prompts = [truncated(ids, k, param) for ids in prompts]
        if any(not ids for ids in prompts):
            raise bad_request(f"{param} is empty: it encodes to zero tokens", param)
        run = _Run(state, prefix, 1, None, lora=lora)
        await run.start(prompts, [params] * len(prompts))
        return run

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        """OpenAI's embeddings route, on a pooling engine (`hal serve --runner pooling`)."""
        state.check_available()
        req = parse_request(EmbeddingRequest, await _read_body(request, max_body_bytes))
        lora = state.check_model(req.model)
        try:
            params = PoolingParams(
                dimensions=req.dimensions, truncate_prompt_tokens=req.truncate_prompt_tokens
            )
        except ValueError as e:
            raise bad_request(str(e), str(e).split(" ", 1)[0]) from e
        run = await pooled(req.inputs(), params, "embd", "embeddings", "input", lora)

        def body(outs) -> dict:
            data = []
            for i, out in enumerate(outs):
                vec = out.outputs.embedding
                if req.encoding_format == "base64":
                    vec = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
                data.append({"object": "embedding", "index": i, "embedding": vec})
            tokens = sum(run.prompt_lens)
            return {"object": "list", "data": data, "model": run.model_name,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

        return await run.respond(request, body)

    async def similarities(request: Request, pairs: list[tuple], prefix: str, param: str, build,
                           lora: LoRARequest | None):  # fmt: skip
        """Embed each distinct text of `pairs` once (normalized) and answer build(run, the
        pairs' cosine similarities)."""
        texts = distinct_texts(pairs)
        run = await pooled(texts, PoolingParams(normalize=True), prefix, "scores", param, lora)

        def body(outs) -> dict:
            return build(run, pair_scores(pairs, texts, [o.outputs.embedding for o in outs]))

        return await run.respond(request, body)

    @app.post("/score")
    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        """vLLM's score route for embedding models: the cosine similarity of each pair."""
        state.check_available()
        req = parse_request(ScoreRequest, await _read_body(request, max_body_bytes))
        lora = state.check_model(req.model)
        try:
            pairs = score_pairs(req.text_1, req.text_2)
        except ValueError as e:
            raise bad_request(str(e), "text_1") from e

        def build(run, scores) -> dict:
            tokens = sum(run.prompt_lens)
            data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
            return {"id": run.id, "object": "list", "created": run.created,
                    "model": run.model_name, "data": data,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

        return await similarities(request, pairs, "score", "text_1", build, lora)

    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def rerank(request: Request) -> Response:
        """The Jina / Cohere rerank route: documents by cosine similarity to the query, best
        first, the top_n of them."""
        state.check_available()
        req = parse_request(RerankRequest, await _read_body(request, max_body_bytes))
        lora = state.check_model(req.model)
        pairs = [(req.query, d) for d in req.documents]

        def build(run, scores) -> dict:
            order = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n]
            results = []
            for i in order:
                r: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
                if req.return_documents:
                    r["document"] = {"text": req.documents[i]}
                results.append(r)
            return {"id": run.id, "model": run.model_name, "results": results,
                    "usage": {"total_tokens": sum(run.prompt_lens)}}  # fmt: skip

        return await similarities(request, pairs, "rerank", "documents", build, lora)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        """vLLM's route: the prompt's (or rendered chat's) token ids, as generation takes them."""
        req = parse_request(TokenizeRequest, await _read_body(request, max_body_bytes))
        req.check()
        state.check_model(req.model)
        tok = engine.tokenizer
        if req.messages is not None:
            conversation = [{"role": m.role, "content": m.text()} for m in req.messages]
            ids = chat_ids(conversation, req.add_generation_prompt)
        else:
            ids = list(tok.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        body: dict[str, Any] = {
            "count": len(ids), "max_model_len": engine.max_model_len, "tokens": list(ids)
        }  # fmt: skip
        if req.return_token_strs:
            body["token_strs"] = tok.convert_ids_to_tokens(list(ids))
        return body

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = parse_request(DetokenizeRequest, await _read_body(request, max_body_bytes))
        state.check_model(req.model)
        vocab = engine.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token ids must be in [0, {vocab}), got {bad[:5]}", "tokens")
        return {"prompt": engine.tokenizer.decode(req.tokens)}

    def lora_card(lora: LoRARequest) -> dict[str, Any]:
        return {**model_card(), "id": lora.lora_name, "root": lora.lora_path,
                "parent": served_model_name}  # fmt: skip

    if allow_runtime_lora_updating:
        if getattr(engine.engine, "lora", None) is None:
            raise ValueError("--allow-runtime-lora-updating needs --enable-lora")
        loading: set[str] = set()  # names whose adapter is being read

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request) -> Response:
            state.check_available()
            req = parse_request(LoadLoRAAdapterRequest, await _read_body(request, max_body_bytes))
            name = req.lora_name
            if name == served_model_name or name in state.lora_modules or name in loading:
                raise bad_request(f"The lora adapter '{name}' has already been loaded.",
                                  "lora_name")  # fmt: skip
            manager = engine.engine.lora
            lora = LoRARequest(name, state.lora_ids + 1, req.lora_path)  # never reused
            state.lora_ids = lora.lora_int_id
            loading.add(name)
            try:  # read and checked off the engine's thread, then handed to it
                adapter = await asyncio.to_thread(
                    load_adapter, lora, engine.model_config, manager.max_rank
                )
                await engine.run_on_engine(manager.register, lora, adapter)
            except LoRAError as e:
                raise bad_request(str(e), "lora_path") from e
            finally:
                loading.discard(name)
            state.lora_modules[name] = lora
            logger.info("LoRA adapter %r loaded from %s", name, req.lora_path)
            return Response(f"Success: LoRA adapter '{name}' added successfully.",
                            media_type="text/plain")  # fmt: skip

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: Request) -> Response:
            state.check_available()
            body = await _read_body(request, max_body_bytes)
            req = parse_request(UnloadLoRAAdapterRequest, body)
            lora = state.lora_modules.get(req.lora_name)
            if lora is None or req.lora_int_id not in (None, lora.lora_int_id):
                raise OpenAIError(404, f"The lora adapter '{req.lora_name}' cannot be found.",
                                  "invalid_request_error", "lora_name")  # fmt: skip
            del state.lora_modules[req.lora_name]  # new requests naming it get 404 from here
            await engine.run_on_engine(engine.engine.lora.forget, lora.lora_int_id)
            logger.info("LoRA adapter %r unloaded", req.lora_name)
            return Response(f"Success: LoRA adapter '{req.lora_name}' removed successfully.",
                            media_type="text/plain")  # fmt: skip

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        cards = [model_card()] + [lora_card(lora) for lora in state.lora_modules.values()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        lora = state.check_model(model_id)
        return model_card() if lora is None else lora_card(lora)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        state.check_available()
        req = parse_request(CompletionRequest, await _read_body(request, max_body_bytes))
        req.warn_unknown_fields()
        req.check()
        lora = state.check_model(req.model)
        prompts: list[tuple[str | None, list[int]]] = []
        vocab = engine.model_config.vocab_size
        for p in req.prompts():
            if isinstance(p, str):
                prompts.append((p, list(engine.tokenizer.encode(p))))
                continue
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise bad_request(
                    f"prompt token ids must be in [0, {vocab}), got {bad[:5]}", "prompt"
                )
            prompts.append((None, list(p)))
        params = []
        # echo with logprobs: the prompt's logprobs too; echo with max_tokens 0: only those
        # (one token is generated and dropped, as vLLM does).
        prompt_logprobs = req.logprobs if req.echo else None
        if req.prompt_logprobs is not None:  # vLLM's field; echo's logprobs need no more
            prompt_logprobs = max(prompt_logprobs or 0, req.prompt_logprobs)
        cut = [truncated(ids, req.truncate_prompt_tokens, "prompt") for _, ids in prompts]
        # a cut text prompt echoes as its kept tokens' text
        prompts = [
            (t if len(c) == len(ids) else None, c) for (t, ids), c in zip(prompts, cut, strict=True)
        ]
        for _, ids in prompts:
            if not ids:
                raise bad_request("prompt is empty: it encodes to zero tokens", "prompt")
            max_tokens = _resolve_max_tokens(
                state,
                1 if req.echo_only else req.max_tokens,
                defaults.get("max_tokens", DEFAULT_COMPLETION_MAX_TOKENS),
                len(ids),
                "max_tokens",
                "prompt",
            )
            params.append(
                req.to_sampling_params(max_tokens, req.logprobs, prompt_logprobs, defaults)
            )
        run = _Run(state, "cmpl", req.n, req.logprobs, echo_only=req.echo_only, lora=lora)
        run.prompt_logprobs = req.prompt_logprobs
        run.return_token_ids = req.return_token_ids
        await run.start([ids for _, ids in prompts], params, req.priority)
        echo = None
        if req.echo:
            echo = [engine.tokenizer.decode(ids) if t is None else t for t, ids in prompts]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(run, run.stream_completion(echo, include_usage))
        return await run.respond(request, lambda outs: run.completion_body(outs, echo))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        state.check_available()
        req = parse_request(ChatCompletionRequest, await _read_body(request, max_body_bytes))
        req.warn_unknown_fields()
        req.check()
        lora = state.check_model(req.model)
        mode, tool = req.tool_mode(auto_parser=state.tool_parser is not None)
        ids = chat_ids(
            req.conversation(), req.add_generation_prompt, req.tool_dicts(),
            req.continue_final_message, req.chat_template_kwargs, req.chat_template,
        )  # fmt: skip
        ids = truncated(ids, req.truncate_prompt_tokens, "messages")
        if req.max_completion_tokens is not None:
            field_name = "max_completion_tokens"
        else:
            field_name = "max_tokens"
        max_tokens = _resolve_max_tokens(
            state, req.requested_max_tokens(), defaults.get("max_tokens"), len(ids), field_name,
            "messages",
        )  # fmt: skip
        params = req.to_sampling_params(
            max_tokens, req.engine_logprobs(), req.prompt_logprobs, defaults
        )
        reply = None
        if mode == "named":
            # compact JSON (no whitespace runs): what clients parse as arguments
            so = StructuredOutputsParams(json=function_schema(tool), disable_any_whitespace=True)
            params = dataclasses.replace(params, structured_outputs=so)
            reply = ToolReply("named", name=tool["function"]["name"])
        elif mode == "required":
            so = StructuredOutputsParams(
                json=required_schema(req.tool_dicts()), disable_any_whitespace=True
            )
            params = dataclasses.replace(params, structured_outputs=so)
            reply = ToolReply("required")
        elif mode == "auto":
            parser = make_parser(state.tool_parser)
            reply = ToolReply("auto", parser=parser)
            if parser.keeps_special_tokens:  # the calls' markers are special tokens
                params = dataclasses.replace(params, skip_special_tokens=False)
        # a constrained reply (structured outputs, a named or required tool) has no thinking
        reasoning = state.reasoning if params.structured_outputs is None else None
        run = _Run(state, "chatcmpl", req.n, req.engine_logprobs(), tools=reply,
                   reasoning=reasoning, lora=lora)  # fmt: skip
        run.prompt_logprobs = req.prompt_logprobs
        run.return_token_ids = req.return_token_ids
        await run.start([ids], [params], req.priority)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(run, run.stream_chat(include_usage))
        return await run.respond(request, run.chat_body)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes before reading them all."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise OpenAIError(
            413, f"request body of {length} bytes exceeds the limit of {limit} bytes", code=None
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _resolve_max_tokens(
    state: ServerState,
    requested: int | None,
    default: int | None,
    prompt_len: int,
    name: str,
    prompt_param: str,
) -> int:
    """max_tokens checked against the server's limit and the context; None takes the default
    (or the room left in the context, capped by the limit)."""
    max_len = state.engine.max_model_len
    if prompt_len >= max_len:
        raise bad_request(
            f"This model's maximum context length is {max_len} tokens. However, your prompt has "
            f"{prompt_len} tokens; at most {max_len - 1} leave room for one generated token.",
            prompt_param,
            "context_length_exceeded",
        )
    room = max_len - prompt_len
    if requested is None:
        return min(default or room, room, state.max_tokens_limit)
    if requested < 1:
        raise bad_request(f"{name} must be at least 1, got {requested}", name)
    if requested > state.max_tokens_limit:
        raise bad_request(
            f"{name}={requested} exceeds this server's limit of {state.max_tokens_limit} "
            f"(hal serve --max-tokens-limit)",
            name,
        )
    if requested > room:
        raise bad_request(
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
            f"completion). Please reduce the prompt or {name}.",
            name,
            "context_length_exceeded",
        )
    return requested


def _sse(run: _Run, events: AsyncIterator[str]) -> StreamingResponse:
    # The background task runs after the response, also when the client left before the first
    # chunk (then the event generator never started, so its own cleanup never ran).
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
        background=BackgroundTask(run.close),
    )


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclass
class _Choice:
    """What a stream has sent of one choice so far."""

    num_chars: int = 0
    num_tokens: int = 0
    finished: bool = False
    started: bool = False


class _Run:
    """One API request: its engine requests (one per prompt, each with n samples) and the
    conversion of their outputs to OpenAI responses and stream chunks."""

    def __init__(
        self,
        state: ServerState,
        prefix: str,
        n: int,
        logprobs: int | None,
        echo_only: bool = False,
        tools: ToolReply | None = None,
        reasoning: ReasoningParser | None = None,
        lora: LoRARequest | None = None,
    ) -> None:
        self.state = state
        self.lora = lora  # the LoRA adapter the request named as its model (None: the base)
        self.model_name = state.model_name if lora is None else lora.lora_name
        self.reasoning = reasoning  # chat: splits the replies' thinking off
        self.tools = tools  # chat with tool calls: how choices become messages
        self.echo_only = echo_only  # completions echo with max_tokens 0: nothing generated
        self.prompt_logprobs: int | None = None  # vLLM's prompt_logprobs field: its k
        self.return_token_ids = False  # vLLM's: token ids of the prompt and the choices too
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n = n
        self.logprobs = logprobs
        self.streams: list[RequestStream] = []
        self.prompt_lens: list[int] = []
        self._finals: list[RequestOutput] = []  # streaming: every prompt's last output
        self._latest: dict[int, RequestOutput] = {}  # streaming: each prompt's newest output
        self._aborted = False  # streaming: some choice finished with "abort"

    async def start(
        self, prompts: list[list[int]], params: list[SamplingParams], priority: int = 0
    ) -> None:
        """Queue every prompt; if one fails, abort those already queued."""
        try:
            # Constraints compile here, off the engine's loop thread (add_request finds them
            # cached).
            compiler = getattr(getattr(self.state.engine, "engine", None), "structured", None)
            for p in params:
                so = getattr(p, "structured_outputs", None)  # PoolingParams have none
                if so is not None and compiler is not None:
                    await asyncio.to_thread(compiler.compile, so)
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
                rid = f"{self.id}-{i}"
                stream = await self.state.engine.add_request(
                    None, p, ids, rid, priority, lora_request=self.lora
                )
                self.streams.append(stream)
                self.prompt_lens.append(len(ids))
        except BaseException as e:
            self.abort("request failed")
            if isinstance(e, EngineDeadError):
                raise OpenAIError(503, str(e), "server_error") from e
            if isinstance(e, (ValueError, TypeError)):
                raise bad_request(str(e)) from e
            raise

    def abort(self, reason: str) -> None:
        for s in self.streams:
            s.abort(reason)

    async def close(self) -> None:
        """After the response: abort whatever still runs (no-op for finished requests)."""
        self.abort("client went away")

    async def merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from every stream as they come; aborts all when left early."""
        try:
            if len(self.streams) == 1:
                async for out in self.streams[0]:
                    yield 0, out
                return
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, stream: RequestStream) -> None:
                try:
                    async for out in stream:
                        queue.put_nowait((i, out))
                except Exception as e:  # noqa: BLE001 - re-raised by the consumer
                    queue.put_nowait((i, e))
                finally:
                    queue.put_nowait((i, None))

            tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
            try:
                remaining = len(tasks)
                while remaining:
                    i, item = await queue.get()
                    if item is None:
                        remaining -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield i, item
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            self.abort("client went away")

    def abort_reason(self) -> str | None:
        return next((s.abort_reason for s in self.streams if s.abort_reason), None)

    # -- non-streaming ------------------------------------------------------------------------
    async def respond(self, request: Request, build) -> Response:
        """Wait for every final output (aborting if the client leaves), then build the body."""
        finals: dict[int, RequestOutput] = {}

        async def collect() -> None:
            async for i, out in self.merged():
                if out.finished:
                    finals[i] = out

        task = asyncio.create_task(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    logger.info("%s: client disconnected; aborting", self.id)
                    task.cancel()
                    return Response(status_code=499)
            task.result()
        except EngineDeadError as e:
            raise OpenAIError(503, str(e), "server_error") from e
        finally:
            if not task.done():
                task.cancel()
        reason = self.abort_reason()
        if reason is not None and any(_was_aborted(out) for out in finals.values()):
            raise OpenAIError(503, f"request aborted: {reason}", "server_error")
        outs = [finals[i] for i in range(len(self.streams))]
        return JSONResponse(build(outs))

    def _usage(self, outs: list[RequestOutput]) -> dict[str, int]:
        generated = 0
        if not self.echo_only:
            generated = sum(len(c.token_ids) for out in outs for c in out.outputs)
        cached = sum(getattr(out, "num_cached_tokens", 0) for out in outs)
        return usage(sum(self.prompt_lens), generated, cached)

    def _echoed(self, out: RequestOutput, c: CompletionOutput, end: int, prefix: str | None):
        """A completion choice's text, logprobs and finish from its first token through `end`:
        the echoed prompt (its logprobs first when asked) and, unless echo_only, the output."""
        text, gen_end, finish = c.text, end, c.finish_reason
        if self.echo_only:
            text, gen_end, finish = "", 0, "length" if c.finish_reason else None
        logprobs = None
        if self.logprobs is not None:
            offset = 0
            head = None
            if prefix is not None:
                head = prompt_completion_logprobs(out, self.logprobs, self.state.token_text)
                offset = sum(len(t) for t in head["tokens"])
            logprobs = completion_logprobs(
                c, 0, gen_end, self.logprobs, self.state.token_text, offset
            )
            if head is not None:
                logprobs = join_logprobs(head, logprobs)
        return (prefix or "") + text, logprobs, finish

    def completion_body(self, outs: list[RequestOutput], echo: list[str] | None) -> dict:
        choices = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                prefix = echo[i] if echo else None
                text, logprobs, finish = self._echoed(out, c, len(c.token_ids), prefix)
                choice = {
                    "index": i * self.n + c.index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                    "stop_reason": c.stop_reason if not self.echo_only else None,
                }
                if self.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs_field(out, self.prompt_logprobs)
                if self.return_token_ids:
                    choice["prompt_token_ids"] = list(out.prompt_token_ids)
                    choice["token_ids"] = [] if self.echo_only else list(c.token_ids)
                choices.append(choice)
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
            "usage": self._usage(outs),
        }

    def chat_body(self, outs: list[RequestOutput]) -> dict:
        choices = []
        reasoning_parser = self.reasoning
        for c in outs[0].outputs:
            reasoning, text = None, c.text
            if reasoning_parser is not None:
                reasoning, text = reasoning_parser.split(c.text)
            message, finish = {"role": "assistant", "content": text}, c.finish_reason
            if self.tools is not None:
                message, finish = self.tools.message(text or "", finish)
            if reasoning_parser is not None:
                message["reasoning_content"] = reasoning
            choice = {
                "index": c.index,
                "message": message,
                "logprobs": self._chat_logprobs(c, 0, len(c.token_ids)),
                "finish_reason": finish,
                "stop_reason": c.stop_reason,
            }
            if self.return_token_ids:
                choice["token_ids"] = list(c.token_ids)
            choices.append(choice)
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
            "usage": self._usage(outs),
        }
        if self.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_field(outs[0], self.prompt_logprobs)
        if self.return_token_ids:
            body["prompt_token_ids"] = list(outs[0].prompt_token_ids)
        return body

    def _completion_logprobs(self, c: CompletionOutput, start: int, end: int, offset: int):
        if self.logprobs is None:
            return None
        return completion_logprobs(c, start, end, self.logprobs, self.state.token_text, offset)

    def _chat_logprobs(self, c: CompletionOutput, start: int, end: int):
        if self.logprobs is None:
            return None
        return chat_logprobs(c, start, end, self.logprobs, self.state.token_text)

    # -- streaming ------------------------------------------------------------------------------
    def _chunk(self, obj: str, choices: list[dict], usage_: dict | None = None) -> dict:
        chunk = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
        }
        if usage_ is not None:
            chunk["usage"] = usage_
        return chunk

    async def _deltas(self):
        """(choice index, CompletionOutput, new text, token range, finish reason) per update."""
        sent: dict[int, _Choice] = {}
        finals: dict[int, RequestOutput] = {}
        async for i, out in self.merged():
            self._latest[i] = out
            if out.finished:
                finals[i] = out
            for c in out.outputs:
                index = i * self.n + c.index
                st = sent.setdefault(index, _Choice())
                if st.finished:
                    continue
                text = c.text[st.num_chars :]
                start, end = st.num_tokens, len(c.token_ids)
                st.num_chars, st.num_tokens = len(c.text), end
                st.finished = c.finish_reason is not None
                self._aborted = self._aborted or c.finish_reason == "abort"
                wants_tokens = self.logprobs is not None or self.return_token_ids
                if text or c.finish_reason or (wants_tokens and end > start):
                    first = not st.started
                    st.started = True
                    yield index, c, text, (start, end), c.finish_reason, first
        self._finals = [finals[i] for i in sorted(finals)]

    async def _stream(self, obj: str, make_choice, include_usage: bool) -> AsyncIterator[str]:
        try:
            async for index, c, text, span, finish, first in self._deltas():
                choice = make_choice(index, c, text, span, finish, first)
                chunk = self._chunk(obj, [choice])
                if self.return_token_ids:  # vLLM's: chat's prompt ids on the chunk, else choice's
                    choice["token_ids"] = [] if self.echo_only else c.token_ids[span[0] : span[1]]
                    if first:
                        holder = chunk if obj == "chat.completion.chunk" else choice
                        prompt = self._latest[index // self.n].prompt_token_ids
                        holder["prompt_token_ids"] = list(prompt)
                yield _event(chunk)
            if include_usage:
                yield _event(self._chunk(obj, [], self._usage(self._finals)))
            reason = self.abort_reason()
            if self._aborted and reason is not None:
                body = error_body(f"request aborted: {reason}", "server_error", None, "aborted")
                yield _event(body)
        except EngineDeadError as e:
            yield _event(error_body(str(e), "server_error", None, "engine_dead"))
        yield "data: [DONE]\n\n"

    def stream_completion(self, echo: list[str] | None, include_usage: bool) -> AsyncIterator[str]:
        offsets: dict[int, int] = {}

        def make_choice(index, c, text, span, finish, first) -> dict:
            if first and (echo or self.echo_only):
                # The first chunk: the echoed prompt, its logprobs and the output so far.
                out = self._latest[index // self.n]
                prefix = echo[index // self.n] if echo else None
                text, logprobs, finish = self._echoed(out, c, span[1], prefix)
            elif self.echo_only:
                text, logprobs, finish = "", None, "length" if finish else None
            else:
                logprobs = self._completion_logprobs(c, span[0], span[1], offsets.get(index, 0))
            if logprobs is not None and logprobs["tokens"]:
                last = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                offsets[index] = last
            return {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
                "stop_reason": c.stop_reason if finish and not self.echo_only else None,
            }

        return self._stream("text_completion", make_choice, include_usage)

    def stream_chat(self, include_usage: bool) -> AsyncIterator[str]:
        thinking = None if self.reasoning is None else ReasoningStream(self.reasoning)
        sent: dict[int, int] = {}  # choice -> answer characters sent (with thinking, no tools)

        def make_choice(index, c, text, span, finish, first) -> dict:
            if self.tools is not None or thinking is not None:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                body = c.text
                if thinking is not None:
                    reasoning, body = thinking.step(index, c.text, finish is not None)
                    if reasoning:
                        delta["reasoning_content"] = reasoning
                if self.tools is not None:
                    tool_delta, finish = self.tools.delta(index, body, finish, False)
                    delta.update(tool_delta)
                elif len(body) > sent.get(index, 0):
                    delta["content"] = body[sent.get(index, 0) :]
                    sent[index] = len(body)
                return {
                    "index": index,
                    "delta": delta,
                    "logprobs": self._chat_logprobs(c, span[0], span[1]),
                    "finish_reason": finish,
                }
            delta = {"role": "assistant"} if first else {}
            if text or first:
                delta["content"] = text
            return {
                "index": index,
                "delta": delta,
                "logprobs": self._chat_logprobs(c, span[0], span[1]),
                "finish_reason": finish,
            }

        return self._stream("chat.completion.chunk", make_choice, include_usage)


def _was_aborted(out) -> bool:
    """A final output that some choice of ended by an abort (an embedding: left without one)."""
    if isinstance(out, EmbeddingRequestOutput):
        return not out.outputs.embedding
    return any(c.finish_reason == "abort" for c in out.outputs)


def _package_version() -> str:
    try:
        return importlib.metadata.version("hal-engine")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown"
