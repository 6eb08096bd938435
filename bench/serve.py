"""Serving benchmark: a load generator for the OpenAI-compatible server (`hal serve`).

Two modes, each a sweep: a Poisson request rate (--request-rate 1,2,inf) or a fixed number of
concurrent clients (--concurrency 1,4,16). Every request streams (server-sent events) with EOS
ignored, so each produces exactly its max_tokens. Reported per run: time to first token (TTFT),
time per output token after the first (TPOT), end-to-end latency (p50/p90/p99, ms), requests/s and
output tokens/s.

    python bench/serve.py --launch                          # starts `hal serve` (default model)
    python bench/serve.py --base-url http://127.0.0.1:8000 --concurrency 1,8,32
    python bench/serve.py --launch path/to/model --request-rate 2,8,inf --num-prompts 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
         "matches in paris during the warm summer evening").split()  # fmt: skip


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from sending to the first token
    e2e: float = 0.0  # seconds from sending to the last byte
    itl: list[float] = field(default_factory=list)  # gaps between token-carrying chunks
    error: str = ""


@dataclass
class RunSummary:
    mode: str  # "rate" or "concurrency"
    value: float
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    mean_prompt_tokens: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    errors: list[str]
    load_avg_1m: float  # this host's load average at the end of the run (shared machines)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    a = np.asarray(values) * 1000.0
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


def make_prompts(num: int, input_words: int, seed: int) -> list[str]:
    """Distinct synthetic prompts (a numbered prefix defeats the prefix cache between them)."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(input_words)) for i in range(num)]


async def send_one(http: httpx.AsyncClient, args, prompt: str, max_tokens: int) -> RequestResult:
    body = {
        "model": args.model,
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if args.endpoint == "chat":
        url = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        url = "/v1/completions"
        body["prompt"] = prompt
    result = RequestResult(ok=False)
    start = time.perf_counter()
    last = None
    try:
        async with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                result.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - start
    result.ok = result.output_tokens == max_tokens
    if not result.ok:
        result.error = f"got {result.output_tokens} tokens, wanted {max_tokens}"
    return result


async def run_load(args, mode: str, value: float) -> RunSummary:
    prompts = make_prompts(args.num_prompts, args.input_words, args.seed)
    rng = random.Random(args.seed + 1)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=args.timeout, limits=limits
    ) as http:
        tasks: list[asyncio.Task] = []
        start = time.perf_counter()
        if mode == "rate":
            for prompt in prompts:
                tasks.append(asyncio.create_task(send_one(http, args, prompt, args.output_len)))
                if value != float("inf"):
                    await asyncio.sleep(rng.expovariate(value))
        else:
            gate = asyncio.Semaphore(int(value))

            async def gated(prompt: str) -> RequestResult:
                async with gate:
                    return await send_one(http, args, prompt, args.output_len)

            tasks = [asyncio.create_task(gated(p)) for p in prompts]
        results: list[RequestResult] = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return RunSummary(
        mode=mode,
        value=value,
        num_requests=len(results),
        completed=len(done),
        failed=len(results) - len(done),
        duration_s=duration,
        request_throughput=len(done) / duration,
        output_throughput=output_tokens / duration,
        mean_prompt_tokens=float(np.mean([r.prompt_tokens for r in done])) if done else 0.0,
        ttft_ms=_percentiles([r.ttft for r in done]),
        tpot_ms=_percentiles(tpot),
        itl_ms=_percentiles([t for r in done for t in r.itl]),
        e2e_ms=_percentiles([r.e2e for r in done]),
        errors=sorted({r.error for r in results if not r.ok})[:5],
        load_avg_1m=os.getloadavg()[0],
    )


def _format(s: RunSummary) -> str:
    label = "inf" if s.value == float("inf") else f"{s.value:g}"
    head = f"{'rate' if s.mode == 'rate' else 'concurrency'} {label}"

    def pct(d: dict[str, float]) -> str:
        return f"{d['p50']:.0f}/{d['p90']:.0f}/{d['p99']:.0f}"

    return (
        f"{head:>16}: {s.completed}/{s.num_requests} ok in {s.duration_s:.1f}s, "
        f"{s.request_throughput:.2f} req/s, {s.output_throughput:.1f} out tok/s | "
        f"TTFT p50/p90/p99 {pct(s.ttft_ms)} ms | TPOT {pct(s.tpot_ms)} ms | "
        f"E2E {pct(s.e2e_ms)} ms | load {s.load_avg_1m:.1f}"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(args) -> subprocess.Popen:
    """Start `hal serve` on a free loopback port and wait (bounded) until /health answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "engine.commands", "serve"]
    if args.launch != "default":
        cmd.append(args.launch)
    cmd += ["--port", str(port), "--log-level", "warning", *args.serve_arg]
    print(f"launching: {' '.join(cmd)}", file=sys.stderr)
    env = {**os.environ, "HAL_API_KEY": args.api_key} if args.api_key else None
    proc = subprocess.Popen(cmd, env=env)
    args.base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.launch_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"hal serve exited with code {proc.returncode} while starting")
        try:
            if httpx.get(args.base_url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"hal serve did not answer /health within {args.launch_timeout} s")


def _values(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--launch",
        nargs="?",
        const="default",
        default=None,
        metavar="MODEL",
        help="start `hal serve [MODEL]` on a free port first (no MODEL: the default model)",
    )
    p.add_argument(
        "--serve-arg", action="append", default=[], help="extra argument for hal serve (repeat)"
    )
    p.add_argument("--launch-timeout", type=float, default=180.0)
    p.add_argument("--model", default=None, help="model id (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("HAL_API_KEY"))
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per run")
    p.add_argument("--input-words", type=int, default=32, help="words per synthetic prompt")
    p.add_argument("--output-len", type=int, default=64, help="tokens each request generates")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--request-rate", type=_values, default=None, help="e.g. 1,4,inf (req/s)")
    p.add_argument("--concurrency", type=_values, default=None, help="e.g. 1,8,32")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every run's summary here")
    args = p.parse_args(argv)
    if args.request_rate is None and args.concurrency is None:
        args.concurrency = [1.0, 8.0]
    for name in ("num_prompts", "input_words", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for v in (args.request_rate or []) + (args.concurrency or []):
        if v <= 0:
            p.error(f"request rates and concurrencies must be > 0, got {v}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc = launch_server(args) if args.launch else None
    try:
        if args.model is None:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            models = httpx.get(args.base_url + "/v1/models", headers=headers, timeout=30).json()
            args.model = models["data"][0]["id"]
        # Warm-up: first-call overheads stay out of the figures.
        asyncio.run(run_load(_warmup_args(args), "concurrency", 1))
        runs = [("rate", v) for v in args.request_rate or []]
        runs += [("concurrency", v) for v in args.concurrency or []]
        summaries = []
        print(
            f"model {args.model}, {args.num_prompts} requests/run, ~{args.input_words}-word "
            f"prompts, {args.output_len} output tokens each, endpoint {args.endpoint}; "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before"
        )
        for mode, value in runs:
            s = asyncio.run(run_load(args, mode, value))
            summaries.append(s)
            print(_format(s), flush=True)
            for e in s.errors:
                print(f"    error: {e}")
        if args.json:
            record = {
                "host": platform.node(),
                "machine": platform.machine(),
                "base_url": args.base_url,
                "model": args.model,
                "num_prompts": args.num_prompts,
                "input_words": args.input_words,
                "output_len": args.output_len,
                "endpoint": args.endpoint,
                "runs": [asdict(s) for s in summaries],
            }
            args.json.write_text(json.dumps(record, indent=2))
        return 0 if all(s.failed == 0 for s in summaries) else 1
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _warmup_args(args) -> argparse.Namespace:
    warm = argparse.Namespace(**vars(args))
    warm.num_prompts, warm.output_len = 2, min(args.output_len, 8)
    return warm


if __name__ == "__main__":
    sys.exit(main())
