"""`hal serve`: the OpenAI-compatible server (FastAPI + uvicorn) on loopback by default, with an
optional API key, request limits, and a graceful drain on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
from pathlib import Path

from engine.generation_config import override_generation_config_arg
from engine.pooling import pooler_config_arg
from engine.server.reasoning import REASONING_PARSERS
from engine.server.tools import TOOL_CALL_PARSERS
from engine.spec_config import add_speculative_arg
from engine.tokenizer import load_chat_template
from hal.errors import HalError

logger = logging.getLogger(__name__)

API_KEY_ENV = "HAL_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_DRAIN_TIMEOUT_S = 30.0


def add_serve(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve a model over the OpenAI API (the embedded SmolLM2 model unless MODEL is given)",
        description="Serve /v1/models, /v1/completions, /v1/chat/completions, /health and "
        "/metrics. Binds 127.0.0.1 unless --host says otherwise. See docs/serving.md.",
    )
    p.add_argument("model", nargs="?", default=None, help="Hugging Face folder or .gguf file")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV})",
    )
    p.add_argument("--served-model-name", default=None, help="the model id clients send")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="default 1 MiB")
    p.add_argument(
        "--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help="seconds in-flight requests get to finish after SIGTERM before they are aborted",
    )
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument(
        "--quantization",
        choices=("fp8",),
        default=None,
        help="fp8: quantize a float checkpoint to FP8 at load (needs FP8 hardware or the CPU); "
        "quantized checkpoints (GPTQ, AWQ, ...) are detected without it",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--backend", default=None, help="require (NAME) or prefer (prefer:NAME) one")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
        default="auto",
        help="the paged KV cache's dtype: auto (the model's) or FP8 (half of bf16's bytes)",
    )
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="CPU KV budget")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="never capture decode graphs")
    p.add_argument(
        "--no-async-scheduling",
        action="store_true",
        help="wait for each step's tokens before scheduling the next (default on GPUs: overlap)",
    )
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument(
        "--distributed-executor-backend", default=None, help="mp (default) or ray, when tp x pp > 1"
    )
    add_speculative_arg(p)
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="let chat requests with tools have the model call them in its own format (needs "
        "--tool-call-parser); named and required tool choices work without it",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=None,
        help="how the model writes tool calls: hermes (<tool_call> tags: Qwen 2.5 / 3, Hermes), "
        "llama3_json (a JSON object: Llama 3.1 / 3.2) or pythonic ([f(a=1), ...]: Llama 3.2 / 4)",
    )
    p.add_argument(
        "--scheduling-policy",
        choices=("fcfs", "priority"),
        default="fcfs",
        help="fcfs: arrival order; priority: each request's `priority` (lower first), a waiting "
        "request preempting running ones of lower priority",
    )
    p.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        default=None,
        help="split chat replies' thinking (<think>...</think>) into reasoning_content: "
        "deepseek_r1 (the template opens the tag) or qwen3 (thinking optional)",
    )
    p.add_argument(
        "--runner",
        choices=("generate", "pooling"),
        default="generate",
        help="generate: text (completions, chat); pooling: embeddings (/v1/embeddings), the last "
        "token's final hidden state (or the mean of all: --pooler-config)",
    )
    p.add_argument(
        "--pooler-config",
        type=pooler_config_arg,
        default=None,
        help='a pooling engine\'s pooling, as JSON: {"pooling_type": "LAST" | "MEAN", '
        '"normalize": true | false} (default: the model\'s sentence-transformers setting, else '
        "LAST, normalized)",
    )
    p.add_argument(
        "--allowed-origins",
        type=_json_list_arg,
        default=None,
        help="browser origins allowed to call the server (CORS), as JSON: '[\"http://localhost:"
        "3000\"]' or '[\"*\"]' (default: no CORS headers; vLLM allows every origin)",
    )
    for flag, what in (("--allowed-methods", "methods"), ("--allowed-headers", "request headers")):
        p.add_argument(
            flag, type=_json_list_arg, default=["*"],
            help=f"with --allowed-origins: the {what} allowed, as JSON (default: all)",
        )  # fmt: skip
    p.add_argument(
        "--allow-credentials", action="store_true",
        help="with --allowed-origins: allow cookies / credentials (CORS)",
    )  # fmt: skip
    p.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template (a file or the template's text) used instead of the model's, "
        "e.g. for a base model without one",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of GPU memory the engine may use: weights, activations, KV cache "
        "(default 0.9)",
    )
    p.add_argument(
        "--load-format",
        choices=("auto", "dummy"),
        default="auto",
        help="dummy: random weights from config.json (benchmarks without the checkpoint)",
    )
    p.add_argument(
        "--generation-config",
        default="auto",
        help="auto: requests' default temperature, top_p, top_k, min_p, repetition_penalty and "
        "max_tokens from the model's generation_config.json; vllm: none; or a folder holding one",
    )
    p.add_argument(
        "--override-generation-config",
        type=override_generation_config_arg,
        default=None,
        help="JSON on top of the generation config, e.g. '{\"temperature\": 0.5}'",
    )
    p.add_argument(
        "--enable-lora", action="store_true", help="serve LoRA adapters (vLLM's; eager steps)"
    )
    p.add_argument(
        "--lora-modules",
        nargs="+",
        type=lora_module_arg,
        default=None,
        metavar="NAME=PATH",
        help="PEFT adapter folders served as models of their own: requests name NAME as model",
    )
    p.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter routes (needs "
        "--enable-lora; anyone with the API key can then make the server read a folder)",
    )
    p.add_argument("--max-loras", type=int, default=1, help="adapters resident at once")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    return p


def lora_module_arg(text: str) -> tuple[str, str]:
    """--lora-modules' NAME=PATH."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (an adapter folder), got {text!r}")
    return name, path


def lora_modules(args: argparse.Namespace) -> dict[str, str] | None:
    """{name: path} from --lora-modules (which needs --enable-lora); None without any."""
    if not args.lora_modules:
        return None
    if not args.enable_lora:
        raise HalError("--lora-modules needs --enable-lora")
    modules: dict[str, str] = {}
    for name, path in args.lora_modules:
        if name in modules:
            raise HalError(f"--lora-modules: {name!r} is given twice")
        modules[name] = path
    return modules


def _json_list_arg(text: str) -> list[str]:
    """A JSON list of strings (the CORS options)."""
    from engine.argtypes import json_option

    def checked(value):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a JSON list of strings, got {value!r}")
        return value

    return json_option(text, checked, '["http://localhost:3000"]')


def cors_options(args: argparse.Namespace) -> dict | None:
    """CORSMiddleware keywords from the --allowed-* flags (None without --allowed-origins)."""
    if args.allowed_origins is None:
        if args.allow_credentials:
            raise HalError("--allow-credentials needs --allowed-origins")
        return None
    return dict(
        allow_origins=args.allowed_origins, allow_methods=args.allowed_methods,
        allow_headers=args.allowed_headers, allow_credentials=args.allow_credentials,
    )  # fmt: skip


def served_name(model: str | None) -> str:
    """The id clients use: the default model's name, else the folder or file name."""
    if model is None:
        from engine.loader.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from engine.async_engine import AsyncLLMEngine
    from engine.config import CacheConfig, SchedulerConfig
    from engine.engine_config import EngineConfig, ParallelConfig
    from engine.server.app import build_app

    if not 0 <= args.port <= 65535:
        raise HalError(f"--port must be in [0, 65535], got {args.port}")
    if args.drain_timeout < 0:
        raise HalError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise HalError(
            f"--enable-auto-tool-choice needs --tool-call-parser ({', '.join(TOOL_CALL_PARSERS)})"
        )
    try:
        chat_template = load_chat_template(args.chat_template)
    except (OSError, ValueError) as e:
        raise HalError(f"--chat-template: {e}") from e
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and not api_key:
        logger.warning(
            "binding %s without an API key: anyone who can reach it can use the model "
            "(give --api-key or $%s)",
            args.host,
            API_KEY_ENV,
        )
    try:
        config = EngineConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            backend=args.backend,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            load_format=args.load_format,
            seed=args.seed,
            quantization=args.quantization,
            enforce_eager=args.enforce_eager,
            async_scheduling=False if args.no_async_scheduling else None,
            speculative_config=args.speculative_config,
            runner=args.runner,
            pooler_config=args.pooler_config,
            generation_config=args.generation_config,
            override_generation_config=args.override_generation_config,
            enable_lora=args.enable_lora,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            cache=CacheConfig(
                block_size=args.block_size,
                cache_dtype=args.kv_cache_dtype,
                enable_prefix_caching=not args.no_prefix_caching,
                kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_num_seqs=args.max_num_seqs,
                policy=args.scheduling_policy,
            ),
            parallel=ParallelConfig(
                tensor_parallel_size=args.tensor_parallel_size,
                pipeline_parallel_size=args.pipeline_parallel_size,
                distributed_executor_backend=args.distributed_executor_backend,
            ),
        )
    except (ValueError, TypeError) as e:
        raise HalError(str(e)) from e
    adapters = lora_modules(args)
    try:
        engine = AsyncLLMEngine.from_config(config)
    except (ValueError, TypeError) as e:
        raise HalError(str(e)) from e
    name = args.served_model_name or served_name(args.model)
    try:
        app = build_app(
            engine, name, api_key, args.max_body_bytes, args.max_tokens_limit,
            tool_call_parser=args.tool_call_parser,
            enable_auto_tool_choice=args.enable_auto_tool_choice,
            reasoning_parser=args.reasoning_parser, chat_template=chat_template,
            cors=cors_options(args), lora_modules=adapters,
            allow_runtime_lora_updating=args.allow_runtime_lora_updating,
        )  # fmt: skip
    except (ValueError, TypeError) as e:
        engine.shutdown()
        raise HalError(str(e)) from e
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(args.drain_timeout) + 5,  # backstop after our own drain
    )
    server = make_server(uv_config, app.state.server, args.drain_timeout)
    # uvicorn re-raises the signal it caught once it has shut down; a quiet handler for SIGTERM
    # makes a graceful stop exit 0 instead of dying by the signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        logger.info("serving %s on http://%s:%d/v1", name, args.host, args.port)
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.shutdown()
    return 0


def make_server(config, state, drain_timeout: float):
    """A `uvicorn.Server` that, on SIGTERM/SIGINT, makes the app refuse new requests (503) and
    gives the in-flight ones `drain_timeout` seconds before aborting them with a reason.
    (uvicorn itself stops accepting connections and waits for open ones to finish.)"""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self.loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(state.begin_drain, drain_timeout)
            super().handle_exit(sig, frame)

    return DrainingServer()
