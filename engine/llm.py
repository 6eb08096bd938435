"""The offline API: `LLM(model=...).generate(prompts, sampling_params)`, vLLM's shape."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tqdm import tqdm

from engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence, extend
from engine.config import CacheConfig, SchedulerConfig
from engine.engine_config import EngineConfig, ParallelConfig
from engine.llm_engine import LLMEngine
from engine.lora import LoRARequest
from engine.outputs import RequestOutput
from engine.pooling import (
    EmbeddingRequestOutput,
    PoolerConfig,
    PoolingParams,
    ScoringOutput,
    ScoringRequestOutput,
    distinct_texts,
    pair_scores,
    score_pairs,
)
from engine.sampling_params import SamplingParams
from engine.tokenizer import apply_chat_template, load_chat_template

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class LLM:
    """An engine for offline batches. Keyword arguments mirror vLLM's `LLM`.

    model: a Hugging Face folder, a .gguf file, or None for the embedded SmolLM2 GGUF.
    tensor_parallel_size x pipeline_parallel_size > 1 runs one worker per device (executor "mp" on
    this host, the default, or "ray"); see docs/distributed.md.
    quantization: "fp8" quantizes a float checkpoint to FP8 at load (a device without FP8 is an
    error); quantized checkpoints (GPTQ, AWQ, AutoRound, compressed-tensors, FP8) need nothing.
    async_scheduling: overlap the host's work for a step with the GPU's (default: on for an
    in-process GPU engine); see `EngineConfig`.
    kv_cache_dtype: "auto" (the model's dtype) or "fp8" / "fp8_e4m3" / "fp8_e5m2": the paged KV
    cache in FP8 (half of bf16's bytes, so twice the tokens fit), values stored unscaled
    (kv_scale 1) and decoded exactly by the attention kernels.
    runner: "generate" (text), or "pooling": an embedding engine (`embed`, `engine.pooling`).
    pooler_config: a pooling engine's pooling, vLLM's {"pooling_type": "LAST" | "MEAN",
    "normalize": bool} (None: the model's sentence-transformers setting, else LAST).
    generation_config: "auto" takes default sampling parameters from the model's
    generation_config.json (`get_default_sampling_params`, used where no SamplingParams is
    given), "vllm" ignores it, a folder reads that one's; override_generation_config
    ({"temperature": 0.6, "max_new_tokens": 64, ...}) goes on top (vLLM's;
    `engine.generation_config`).
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        *,
        max_model_len: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        preemption_mode: str = "recompute",
        scheduling_policy: str = "fcfs",
        swap_space: float = 4.0,
        num_gpu_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        backend: str | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        load_format: str = "auto",
        cuda_graph_sizes: Sequence[int] | None = None,
        mixed_graph_sizes: Sequence[int] | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
        quantization: str | None = None,
        async_scheduling: bool | None = None,
        kv_cache_dtype: str = "auto",
        speculative_config: dict | None = None,
        runner: str = "generate",
        pooler_config: PoolerConfig | dict | None = None,
        generation_config: str = "auto",
        override_generation_config: dict | None = None,
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 16,
    ) -> None:
        cache = CacheConfig(
            block_size=block_size,
            cache_dtype=kv_cache_dtype,
            enable_prefix_caching=enable_prefix_caching,
            swap_space_gib=swap_space,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            num_gpu_blocks=num_gpu_blocks,
        )
        sched = SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            enable_chunked_prefill=enable_chunked_prefill,
            preemption_mode=preemption_mode,
            policy=scheduling_policy,
        )
        self.config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            backend=backend,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            quantization=quantization,
            enforce_eager=enforce_eager,
            load_format=load_format,
            cuda_graph_sizes=None if cuda_graph_sizes is None else tuple(cuda_graph_sizes),
            mixed_graph_sizes=None if mixed_graph_sizes is None else tuple(mixed_graph_sizes),
            async_scheduling=async_scheduling,
            speculative_config=speculative_config,
            runner=runner,
            pooler_config=pooler_config,
            generation_config=generation_config,
            override_generation_config=override_generation_config,
            enable_lora=enable_lora,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            cache=cache,
            scheduler=sched,
            parallel=ParallelConfig(
                tensor_parallel_size=tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size,
                distributed_executor_backend=distributed_executor_backend,
            ),
        )
        self.engine = LLMEngine(self.config)

    def shutdown(self) -> None:
        """Stop the engine's workers, if it has any (tensor or pipeline parallel), and give the
        device memory of an in-process model (weights, KV cache, graphs) back; the LLM cannot
        generate afterwards."""
        self.engine.shutdown()
        self.engine.release_memory()

    def start_profile(self, trace_dir: str | None = None) -> None:
        """Start torch.profiler where the model runs (this process, or every worker rank of a
        parallel engine); `stop_profile()` returns what ran. With trace_dir each rank also
        writes a Chrome trace there. Call between `generate` calls."""
        self.engine.start_profile(trace_dir)

    def stop_profile(self):
        """One engine.profiling.ProfileSummary per rank (kernel device times, wall time, trace
        path) for what ran since `start_profile()`."""
        return self.engine.stop_profile()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (temperature, top_p,
        top_k, min_p, repetition_penalty, max_new_tokens as max_tokens) where it gives them, as
        vLLM's: what generate and chat use when no SamplingParams is passed."""
        return SamplingParams(**self.engine.default_sampling)

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[list[int]] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order. All prompts are validated first.
        priority: one per prompt, lower first (needs scheduling_policy="priority").
        lora_request: the LoRA adapter for every prompt, or one per prompt (None: the base
        model); needs `LLM(..., enable_lora=True)`."""
        items = _items(prompts, prompt_token_ids)
        params_list = self._params_list(sampling_params, len(items))
        if priority is not None and len(priority) != len(items):
            raise ValueError(f"got {len(priority)} priorities for {len(items)} prompts")
        return self._run(items, params_list, use_tqdm, priority, lora_request)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict | None = None,
        chat_template: str | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template (with `tools`, OpenAI's
        function specs, and chat_template_kwargs such as Qwen3's enable_thinking), then
        generate. chat_template: a Jinja template (or a file holding one) used instead.
        lora_request: as in `generate`."""
        template = load_chat_template(chat_template)
        if messages and isinstance(messages[0], dict):
            messages = [messages]  # type: ignore[list-item]
        items = []
        for conv in messages:
            ids = apply_chat_template(
                self.engine.tokenizer, list(conv), add_generation_prompt, tools,  # type: ignore[arg-type]
                continue_final_message, chat_template_kwargs, template,
            )  # fmt: skip
            items.append((self.engine.tokenizer.decode(ids), ids))
        params = self._params_list(sampling_params, len(items))
        return self._run(items, params, use_tqdm, lora_request=lora_request)

    def embed(
        self,
        prompts: str | Sequence[str] | None = None,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        prompt_token_ids: Sequence[list[int]] | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One EmbeddingRequestOutput per prompt (`.outputs.embedding`), in prompt order; needs
        `LLM(..., runner="pooling")`. All prompts are validated first."""
        if self.engine.pooling is None:
            raise ValueError(
                "embed needs a pooling engine: LLM(model, runner='pooling') (this one generates)"
            )
        items = _items(prompts, prompt_token_ids)
        params = self._params_list(pooling_params, len(items), PoolingParams)
        return self._run(items, params, use_tqdm)

    def score(
        self,
        text_1: str | list[int] | Sequence[str | list[int]],
        text_2: str | list[int] | Sequence[str | list[int]],
        *,
        use_tqdm: bool = True,
    ) -> list[ScoringRequestOutput]:
        """vLLM's score for embedding models: the cosine similarity of each pair's embeddings
        (one text_1 against every text_2, or two equal lists pair by pair); needs
        `runner="pooling"`. Each distinct text is embedded once."""
        pairs = score_pairs(
            list(text_1) if isinstance(text_1, tuple) else text_1,
            list(text_2) if isinstance(text_2, tuple) else text_2,
        )
        if self.engine.pooling is None:
            raise ValueError("score needs a pooling engine: LLM(model, runner='pooling')")
        texts = distinct_texts(pairs)
        items = [(t, None) if isinstance(t, str) else (None, list(t)) for t in texts]
        outs = self._run(items, [PoolingParams(normalize=True)] * len(items), use_tqdm)
        scores = pair_scores(pairs, texts, [o.outputs.embedding for o in outs])
        return [ScoringRequestOutput(str(i), ScoringOutput(s)) for i, s in enumerate(scores)]

    def beam_search(
        self,
        prompts: Sequence[str | list[int] | dict],
        params: BeamSearchParams,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search: one BeamSearchOutput per prompt (text, token ids or a
        {"prompt": ...} / {"prompt_token_ids": ...} dict), its beam_width best sequences first
        (`engine.beam_search`). Every beam of every prompt advances in one engine batch a step.
        lora_request: as in `generate` (a prompt's beams all run through its adapter)."""
        engine = self.engine
        loras = _lora_list(lora_request, len(prompts))
        if engine.pooling is not None:
            raise ValueError("beam search generates text: this LLM is a pooling engine")
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
        eos = frozenset(engine.eos_token_ids)
        beams: list[list[BeamSearchSequence]] = []
        for p in prompts:
            if isinstance(p, dict):
                p = p.get("prompt_token_ids", p.get("prompt"))
            ids = engine.tokenize(p) if isinstance(p, str) else list(p)
            engine.validate_request(None, SamplingParams(), ids)
            if len(ids) + params.max_tokens > engine.max_model_len:
                raise ValueError(
                    f"a prompt of {len(ids)} tokens and max_tokens={params.max_tokens} exceed "
                    f"max_model_len={engine.max_model_len}"
                )
            beams.append([BeamSearchSequence(ids, len(ids))])
        done: list[list[BeamSearchSequence]] = [[] for _ in beams]
        # one token a beam, with the alternatives to extend by (raw logprobs)
        step = SamplingParams(
            temperature=0, max_tokens=1, logprobs=2 * params.beam_width, ignore_eos=True
        )
        for _ in range(params.max_tokens):
            live = [b for group in beams for b in group]
            if not live:
                break
            outs = self.generate(
                prompt_token_ids=[b.tokens for b in live], sampling_params=step, use_tqdm=False,
                lora_request=[lora for group, lora in zip(beams, loras, strict=True)
                              for _ in group],
            )  # fmt: skip
            at = 0
            for i, group in enumerate(beams):
                tops = [o.outputs[0].logprobs[0] for o in outs[at : at + len(group)]]
                at += len(group)
                beams[i], ended = extend(group, tops, params, eos)
                done[i] += ended
        tok = engine.tokenizer
        results = []
        for group, ended in zip(beams, done, strict=True):
            best = sorted(ended + group, key=lambda s: -s.score(params.length_penalty, eos))
            best = best[: params.beam_width]
            for s in best:
                s.text = tok.decode(s.output_token_ids, skip_special_tokens=True)
            results.append(BeamSearchOutput(best))
        return results

    def _params_list(self, given, n: int, kind: type = SamplingParams) -> list:
        """One `kind` (SamplingParams, PoolingParams) per prompt: the default (for sampling,
        `get_default_sampling_params()`), one for all, or a list of n."""
        if given is None:
            return [self.get_default_sampling_params() if kind is SamplingParams else kind()] * n
        if isinstance(given, kind):
            return [given] * n
        params = list(given)
        if len(params) != n:
            raise ValueError(f"got {len(params)} {kind.__name__} for {n} prompts")
        return params

    def _run(
        self,
        items: list[tuple[str | None, list[int] | None]],
        params_list: list[SamplingParams],
        use_tqdm: bool,
        priority: Sequence[int] | None = None,
        lora_request=None,
    ) -> list[RequestOutput]:
        engine = self.engine
        # Validate everything before queuing anything, so a bad prompt queues nothing.
        resolved = [
            (prompt, engine.validate_request(prompt, params, ids))
            for (prompt, ids), params in zip(items, params_list, strict=True)
        ]
        loras = _lora_list(lora_request, len(items))
        for lora in dict.fromkeys(loras):  # each adapter read and checked once, before queuing
            engine.check_lora_request(lora)
        if priority is not None and engine.scheduler_config.policy != "priority" and any(priority):
            raise ValueError(
                "priority needs LLM(..., scheduling_policy='priority') (this one schedules first "
                "come, first served)"
            )
        order: dict[str, int] = {}
        for i, ((prompt, ids), params) in enumerate(zip(resolved, params_list, strict=False)):
            p = 0 if priority is None else priority[i]
            rid = engine.add_request(
                prompt, params, prompt_token_ids=ids, priority=p, lora_request=loras[i]
            )
            order[rid] = i
        results: list[RequestOutput | None] = [None] * len(items)
        bar = tqdm(total=len(items), desc="generating", disable=not use_tqdm or len(items) < 2)
        while engine.has_unfinished_requests():
            for out in engine.step(stream=False):
                if out.finished and out.request_id in order:
                    results[order[out.request_id]] = out
                    bar.update(1)
        bar.close()
        return [r for r in results if r is not None]


def _lora_list(lora_request, n: int) -> list[LoRARequest | None]:
    """One LoRARequest (or None) per prompt: the given one for all, or a list of n."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * n
    loras = list(lora_request)
    if len(loras) != n:
        raise ValueError(f"got {len(loras)} lora_requests for {n} prompts")
    return loras


def _items(
    prompts: str | Sequence[str] | None, prompt_token_ids: Sequence[list[int]] | None
) -> list[tuple[str | None, list[int] | None]]:
    """(text, token ids) per prompt, one of them None."""
    if prompts is None and prompt_token_ids is None:
        raise ValueError("give prompts or prompt_token_ids")
    if prompt_token_ids is not None:
        return [(None, list(ids)) for ids in prompt_token_ids]
    if isinstance(prompts, str):
        prompts = [prompts]
    return [(p, None) for p in prompts]  # type: ignore[union-attr]
