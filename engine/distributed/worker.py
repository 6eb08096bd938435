"""One rank of a distributed engine: joins the world, loads its shard of its pipeline stage,
allocates its KV cache and runs the steps the driver sends (in a process or a Ray actor). The
output rank samples on its own device and returns the tokens, not the logits."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from array import array
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from engine.config import resolve_cache_dtype
from engine.distributed.collectives import PipelineChannel, WorldLayout, init_world
from engine.distributed.oneshot import build_workspace
from engine.lora import LoRAWeights, StepLoRA
from engine.memory import MemoryPlan, plan_cpu, plan_gpu
from engine.parallel import SINGLE, ParallelContext
from engine.pooling import pooled_rows
from engine.profiling import ProfileSummary, RankProfiler
from engine.runner import ModelRunner, PackedStep, TokenFeed, pack_step, sampled_rows
from engine.sampler import (
    DeviceSamples,
    PendingSamples,
    PromptRows,
    Sampler,
    SamplerOutput,
    SamplingRow,
    ScoredStep,
    logprob_lists,
    logprob_tensors,
)
from engine.spec_decode import verify_batch
from engine.structured_output import allowed_tokens

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.2


@dataclass
class WorkerSpec:
    """Everything a rank needs to start; picklable (sent to a spawned process or Ray actor)."""

    rank: int
    layout: WorldLayout
    model: str | None
    dtype: str
    device: str  # "cpu" or "cuda:N" (N local to the process's visible devices)
    backend: str | None
    max_model_len: int | None
    block_size: int
    collective_backend: str  # "nccl" or "gloo"
    init_timeout_s: float
    num_threads: int | None = None  # CPU threads for this rank's torch ops (CPU only)
    log_level: int = logging.WARNING
    load_format: str = "auto"  # "dummy": random weights (the same on every rank)
    seed: int = 0
    quantization: str | None = None  # online quantization ("fp8"), as EngineConfig's
    graph_sizes: tuple[int, ...] = ()  # decode batch sizes to capture (empty: eager)
    mixed_graph_sizes: tuple[int, ...] = ()  # token counts of steps with prefill to capture
    max_num_seqs: int | None = None  # sequence slots of a mixed-step capture
    eos_token_ids: tuple[int, ...] = ()  # the output rank's sampler masks them under min_tokens
    kv_cache_dtype: str = "auto"  # CacheConfig.cache_dtype, resolved on the rank's platform
    # a pooling engine's pooling type ("LAST" / "MEAN"): the output rank returns hidden rows
    pooling: str | None = None
    lora: tuple[int, int] | None = None  # LoRA adapters: (max_loras, max_lora_rank)


@dataclass
class WorkerInfo:
    """What a rank reports after loading: its backend, dtype and per-block KV bytes."""

    rank: int
    pid: int
    backend_name: str
    backend_lines: list[str]
    device: str
    dtype: torch.dtype
    block_bytes: int
    weight_bytes: int
    layers: tuple[int, int]
    kv_dtype: torch.dtype


@dataclass
class StepInput:
    """A `SchedulerOutput` without the Python sequence objects: the part the ranks need, the
    batch already packed (`engine.runner.pack_step`; it travels as one bytes object)."""

    batch: PackedStep | None = None  # None: no sequence scheduled (block moves only)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    # Asynchronous scheduling (pipeline size 1): hold keeps the sampled tokens on the device for
    # the next step and answers only when the driver's next message arrives (a step or a
    # flush); feed_rows: this decode-only step's input ids are the held step's samples at these
    # rows (its input token ids are placeholders).
    hold: bool = False
    feed_rows: list[int] | None = None
    # A held step whose every row is plain greedy (`StepSampling.plain_greedy`) at TP > 1: every
    # rank takes the tokens from the LM head's sharded argmax (`ParallelLMHead.greedy`), so no
    # logits are gathered and no tokens broadcast.
    greedy: bool = False
    # Prompt positions to score (SamplingParams.prompt_logprobs): every rank of the last stage
    # computes their logits (the LM head gathers), the output rank answers a ScoredStep.
    prompt: PromptRows | None = None
    # LoRA: adapters to load into slots first, each sequence's slot (engine.lora.StepLoRA)
    lora: StepLoRA | None = None

    @classmethod
    def from_scheduler_output(
        cls,
        out,
        hold: bool = False,
        feed_rows: list[int] | None = None,
        greedy: bool = False,
        prompt: PromptRows | None = None,
        lora: StepLoRA | None = None,
    ) -> StepInput:
        return cls(
            pack_step(out.scheduled) if out.scheduled else None,
            list(out.blocks_to_swap_out),
            list(out.blocks_to_swap_in),
            list(out.blocks_to_copy),
            hold,
            feed_rows,
            greedy,
            prompt,
            lora,
        )


def profile_step(num_tokens: int, block_size: int):
    """The packed step of one num_tokens-token prompt over blocks 1.. (the memory profile's
    forward): a stand-in with every field `pack_step` reads of a ScheduledSeq."""
    num_blocks = -(-num_tokens // block_size) + 1
    blocks = list(range(1, num_blocks))
    slots = [blocks[p // block_size] * block_size + p % block_size for p in range(num_tokens)]
    seq = SimpleNamespace(
        num_new_tokens=num_tokens, start_pos=0, num_samples=1, block_ids=array("i", blocks),
        token_ids=[0] * num_tokens, slot_mapping=slots, draft=[],
    )  # fmt: skip
    return pack_step([seq])


@dataclass
class StepSampling:
    """What the sampler reads for one step: one SamplingRow per sample, in schedule order.

    The logits have one row per sampling sequence; num_samples[i] is how many samples row i gives
    (n on the step a request forks, else 1). None when every sequence gives one sample. Rows carry
    token histories only where penalties or min_tokens read them (empty tuples otherwise).
    """

    rows: list[SamplingRow]
    num_samples: list[int] | None = None
    # Speculative decoding: per sampling sequence its draft tokens (then it has 1 + len(draft)
    # logits rows and one sample); None: no drafts this step.
    drafts: list[tuple[int, ...]] | None = None

    @property
    def plain_greedy(self) -> bool:
        """One sample per row, every row greedy with nothing that reads more of its logits than
        the maximum (no penalties, min_tokens or logprobs): the tokens are the argmax alone."""
        return self.num_samples is None and all(
            r.params.is_greedy
            and not r.params.needs_penalties
            and not r.params.changes_logits
            and r.params.min_tokens == 0
            and r.params.logprobs is None
            for r in self.rows
        )

    def sample(self, sampler: Sampler, logits: torch.Tensor) -> SamplerOutput:
        """logits: [num_sampling_seqs, vocab] -> one token (and logprobs) per row; with drafts,
        1 + len(draft) logits rows for a drafted sequence, whose tokens go in `drafted`."""
        if self.drafts is not None:
            return self._sample_drafted(sampler, logits)
        if self.num_samples is not None:
            if len(self.num_samples) != logits.shape[0] or sum(self.num_samples) != len(self.rows):
                raise ValueError(
                    f"num_samples {self.num_samples} must give one count per logits row "
                    f"({logits.shape[0]}) summing to the {len(self.rows)} sampling rows"
                )
            counts = torch.tensor(self.num_samples, device=logits.device)
            logits = logits.repeat_interleave(counts, dim=0)  # [num_rows, vocab]
        return sampler.sample(logits, self.rows)

    def _sample_drafted(self, sampler: Sampler, logits: torch.Tensor) -> SamplerOutput:
        """Undrafted sequences sample their one row as usual; drafted ones keep their accepted
        drafts and one token of the target's (`spec_decode.verify_batch`, one host transfer)."""
        counts = self.num_samples or [1] * len(self.drafts)
        first_row, first_logit = [], []  # each sequence's first SamplingRow and logits row
        r = lg = 0
        for draft, n in zip(self.drafts, counts, strict=True):
            first_row.append(r)
            first_logit.append(lg)
            r += n
            lg += 1 + len(draft)
        if lg != logits.shape[0] or r != len(self.rows):
            raise ValueError(
                f"drafts {self.drafts}: {lg} logits rows and {r} sampling rows expected, got "
                f"{logits.shape[0]} and {len(self.rows)}"
            )
        plain = [g for g, d in enumerate(self.drafts) if not d]
        drafted = [g for g, d in enumerate(self.drafts) if d]
        n = len(self.rows)
        out = SamplerOutput([0] * n, [None] * n, [None] * n, [None] * n)
        if plain:
            rows = [self.rows[first_row[g] + i] for g in plain for i in range(counts[g])]
            forks = [counts[g] for g in plain] if self.num_samples else None
            part = StepSampling(rows, forks).sample(
                sampler, logits[[first_logit[g] for g in plain]]
            )
            at = 0
            for g in plain:
                for i in range(counts[g]):
                    j = first_row[g] + i
                    out.token_ids[j], out.logprobs[j] = part.token_ids[at], part.logprobs[at]
                    out.top_logprobs[j] = part.top_logprobs[at]
                    out.ranks[j] = part.ranks[at] if part.ranks else None
                    at += 1
        if drafted:
            spans = [
                range(first_logit[g], first_logit[g] + 1 + len(self.drafts[g])) for g in drafted
            ]
            rows = [self.rows[first_row[g]] for g in drafted]
            picked = logits[[i for span in spans for i in span]]
            verify_on = _masked_drafts(picked, rows, spans)  # logprobs stay the raw ones
            verified = verify_batch(
                verify_on, [self.drafts[g] for g in drafted], [row.params for row in rows],
                [row.step_index for row in rows], sampler.shared_generator(logits.device),
            )  # fmt: skip
            at = 0
            for g, row, span, tokens in zip(drafted, rows, spans, verified, strict=True):
                triples = None
                if row.params.logprobs is not None:
                    num_top = [row.params.logprobs] * len(tokens)
                    targets = torch.tensor(tokens, device=logits.device)
                    c, v, i, rk = logprob_tensors(picked[at : at + len(tokens)], targets, num_top)
                    lp, top = logprob_lists(c.tolist(), v.tolist(), i.tolist(), num_top)
                    triples = list(zip(lp, top, rk.tolist(), strict=True))
                out.token_ids[first_row[g]] = tokens[0]
                out.drafted[first_row[g]] = (tokens, triples)
                at += len(span)
        return out


def _masked_drafts(picked: torch.Tensor, rows: list[SamplingRow], spans: list[range]):
    """The drafted rows' logits with each constrained row's per-position masks applied (a copy;
    `picked` itself when no row is constrained)."""
    if all(row.draft_bitmasks is None for row in rows):
        return picked
    out = picked.clone()
    at = 0
    for row, span in zip(rows, spans, strict=True):
        if row.draft_bitmasks is not None:
            allowed = allowed_tokens(row.draft_bitmasks.to(out.device), out.shape[-1])
            part = out[at : at + len(span)]
            out[at : at + len(span)] = part.masked_fill(~allowed, float("-inf"))
        at += len(span)
    return out


class Worker:
    """A rank: `init_world`, `load`, `plan_memory`, `allocate`, then `execute` per step."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.rank = spec.rank
        self.layout = spec.layout
        self.pp_rank, self.tp_rank = spec.layout.coords(spec.rank)
        self.collectives = None
        self.channel: PipelineChannel | None = None
        self.runner: ModelRunner | None = None
        self.model = None
        self.sampler: Sampler | None = None  # the output rank's, made on its first sampled step
        self.held_tokens: torch.Tensor | None = None  # the last held step's samples (device)
        self.profiler = RankProfiler()
        if spec.num_threads and spec.device == "cpu":
            torch.set_num_threads(spec.num_threads)

    def init_world(self, master_addr: str, master_port: int) -> int:
        """Join the process group (bounded by init_timeout_s); returns this process's pid."""
        if self.spec.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.spec.device))
        if self.layout.world_size > 1:
            self.collectives = init_world(
                self.layout,
                self.rank,
                self.spec.collective_backend,
                master_addr,
                master_port,
                self.spec.init_timeout_s,
            )
        if self.layout.pp_size > 1:
            self.channel = PipelineChannel(self.layout, self.rank)
        return os.getpid()

    def load(self) -> WorkerInfo:
        """Load the backend and this rank's shard of its stage; build its runner."""
        import hal
        import platforms
        from engine.loader import load_model
        from engine.memory import weight_bytes

        spec = self.spec
        caps = platforms.detect()
        backend_choice = "cpu" if spec.device == "cpu" else spec.backend
        backend = hal.load_backend(caps, device=spec.device, configured=backend_choice)
        parallel = SINGLE
        if self.layout.world_size > 1:
            parallel = ParallelContext(
                self.tp_rank, self.layout.tp_size, self.collectives, self.pp_rank,
                self.layout.pp_size,
            )  # fmt: skip
        if self.collectives is not None and spec.collective_backend == "nccl":
            # The all-reduces of decode graphs through the backend's one-shot kernel where it
            # has one (every rank of the TP group builds it here, at the same point).
            self.collectives.oneshot = build_workspace(backend, self.collectives.group)
        self.model, _, _ = load_model(
            spec.model,
            backend,
            spec.dtype,
            parallel,
            max_model_len=spec.max_model_len,
            with_tokenizer=False,
            load_format=spec.load_format,
            seed=spec.seed,
            quantization=spec.quantization,
        )
        fp8 = backend.caps.fp8_dtype
        kv_dtype = resolve_cache_dtype(spec.kv_cache_dtype, self.model.dtype, fp8)
        self.runner = ModelRunner(
            self.model, backend, spec.block_size, kv_dtype,
            graph_sizes=spec.graph_sizes, max_model_len=spec.max_model_len,
            mixed_graph_sizes=spec.mixed_graph_sizes, max_num_seqs=spec.max_num_seqs,
            pooling=spec.pooling,
        )  # fmt: skip
        if spec.lora is not None:  # this rank's shard of every adapter's slots
            self.runner.lora = LoRAWeights(self.model, *spec.lora)
        return WorkerInfo(
            rank=self.rank,
            pid=os.getpid(),
            backend_name=backend.name,
            backend_lines=backend.describe(),
            device=str(backend.device),
            dtype=self.model.dtype,
            block_bytes=self.runner.block_bytes(),
            weight_bytes=weight_bytes(self.model),
            layers=(self.model.layer_start, self.model.layer_stop),
            kv_dtype=kv_dtype,
        )

    def plan_memory(
        self,
        kv_cache_memory_bytes: int,
        num_gpu_blocks: int | None,
        gpu_memory_utilization: float,
        profile_tokens: int,
    ) -> MemoryPlan:
        """This rank's memory plan from its own memory; on a GPU every rank profiles together."""
        runner, block_size = self.runner, self.spec.block_size
        block_bytes = runner.block_bytes()
        if num_gpu_blocks is not None:
            plan = plan_cpu(self.model, block_bytes, block_size, num_gpu_blocks * block_bytes)
            plan.device = str(runner.device)
            return plan
        if runner.device.type == "cpu":
            return plan_cpu(self.model, block_bytes, block_size, kv_cache_memory_bytes)
        peak = self._profile_activation_peak(profile_tokens)
        graphs = mixed = 0
        if not runner.graph_reasons():
            graphs, mixed = runner.graph_pool_estimate(peak, profile_tokens)
        return plan_gpu(
            self.model, runner.device, block_bytes, block_size, gpu_memory_utilization, peak,
            graph_pool_bytes=graphs, mixed_graph_bytes=mixed, min_kv_tokens=runner.max_model_len,
        )  # fmt: skip

    def _profile_activation_peak(self, num_tokens: int) -> int:
        """One forward of num_tokens tokens (all ranks at once, so collectives pair up)."""
        device, block_size = self.runner.device, self.spec.block_size
        num_blocks = -(-num_tokens // block_size) + 1
        self.runner.allocate(num_blocks)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        self.execute(StepInput(profile_step(num_tokens, block_size)))
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        self.runner.kv_caches = []
        torch.cuda.empty_cache()
        return int(peak)

    def allocate(self, num_blocks: int, num_cpu_blocks: int, mixed_graphs: bool = True) -> int:
        """Allocate the KV cache, then capture the decode graphs (every rank at once, so the
        all-reduces inside them pair up; mixed_graphs False: no mixed-step captures, on every
        rank alike); returns the bytes the graphs took."""
        if not mixed_graphs:
            self.runner.drop_mixed_graphs()
        self.runner.allocate(num_blocks, num_cpu_blocks)
        return self.runner.capture_graphs()

    @torch.inference_mode()
    def execute(
        self, step: StepInput, sampling: StepSampling | None = None
    ) -> SamplerOutput | np.ndarray | PendingSamples | None:
        """Run this rank's part of one step. The output rank returns the sampled tokens when the
        driver sent `sampling` (a few bytes), else its fp32 logits [num_sampling_seqs, vocab] as
        numpy, inside a ScoredStep with the prompt rows' logprobs when the step carried some;
        every other rank returns None.

        Seeded rows draw from generators seeded by (seed, step) on this device, so they match the
        in-process engine on the same device type; unseeded random rows draw from this rank's
        shared generator (seeded by the engine's seed), a different stream from world size 1's.
        """
        runner, model = self.runner, self.model
        runner.apply_block_moves(step)
        if step.batch is None:
            return None
        batch = runner.upload(step.batch)
        if step.feed_rows is not None:
            if self.held_tokens is None or self.layout.pp_size > 1:
                raise RuntimeError("a fed step needs the held step before it (pipeline size 1)")
            TokenFeed(self.held_tokens, step.feed_rows).write(batch.input_ids)
        intermediate = None
        if self.channel is not None and self.channel.prev_rank is not None:
            intermediate = self.channel.recv(
                batch.num_tokens, model.config.hidden_size, model.dtype, runner.device
            )
        if runner.lora is None:
            out = runner.forward(batch, intermediate)
        else:
            runner.lora.begin(step.lora)
            try:
                out = runner.forward(batch, intermediate)
            finally:
                runner.lora.end()
        if self.channel is not None and self.channel.next_rank is not None:
            self.channel.send(*out)
            return None
        if step.prompt is not None:
            if step.hold or step.greedy:
                raise RuntimeError("a step that scores prompt positions is never held")
            scored = runner.score_prompt(out, step.prompt)
            result = self._sample(batch, out, sampling)
            return None if scored is None else ScoredStep(result, scored)
        return self._sample(batch, out, sampling, step)

    def _sample(self, batch, out, sampling: StepSampling | None, step: StepInput | None = None):
        """The output rank's samples (or fp32 logits) of a step's sampling rows; None elsewhere.
        step: a held or greedy step's flags (None: neither)."""
        model = self.model
        if self.spec.pooling:  # every rank holds the hidden rows; the output rank answers
            if self.rank != self.layout.output_rank:
                return None
            rows = pooled_rows(out, batch, self.spec.pooling)
            return None if rows is None else rows.cpu().numpy()
        if batch.logits_indices.numel() == 0:
            return None
        if step is not None and step.greedy:
            if not step.hold:  # the driver marks only held, plain-greedy steps greedy
                raise RuntimeError("a greedy step must be held")
            # Every rank gets the tokens (they feed the next step); the output rank answers.
            self.held_tokens = model.compute_greedy(sampled_rows(out, batch))
            return PendingSamples(DeviceSamples(self.held_tokens) if sampling is not None else None)
        logits = model.compute_logits(sampled_rows(out, batch))
        if step is not None and step.hold:
            return self._hold(logits, sampling, batch.logits_indices.shape[0])
        if logits is None:
            return None
        if sampling is not None:
            if self.sampler is None:
                self.sampler = Sampler(self.spec.eos_token_ids, seed=self.spec.seed)
            return sampling.sample(self.sampler, logits)
        # A numpy array pickles as plain bytes; a torch CPU tensor would go through torch's
        # shared-memory file-descriptor passing on every step.
        return logits.cpu().numpy()

    def _hold(
        self, logits: torch.Tensor | None, sampling: StepSampling | None, num_rows: int
    ) -> PendingSamples:
        """Sample on the device (output rank), share the tokens with the group's other ranks
        (they feed the next step too) and answer with a PendingSamples."""
        output = sampling is not None
        if output:
            if logits is None or sampling.num_samples is not None:
                raise RuntimeError("a held step samples one token per row on the output rank")
            if self.sampler is None:
                self.sampler = Sampler(self.spec.eos_token_ids, seed=self.spec.seed)
            samples = self.sampler.sample_tokens(logits, sampling.rows)
            tokens = samples.token_ids
        else:  # receives the output rank's tokens below
            samples = None
            tokens = torch.empty(num_rows, dtype=torch.int64, device=self.runner.device)
        if self.collectives is not None and self.layout.tp_size > 1:
            out_tp = self.layout.coords(self.layout.output_rank)[1]
            self.collectives.broadcast(tokens, out_tp)
        self.held_tokens = tokens
        return PendingSamples(samples)

    def start_profile(self, trace_dir: str | None = None) -> None:
        """Start torch.profiler on this rank (`LLM.start_profile`)."""
        self.profiler.start(trace_dir, self.spec.device)

    def stop_profile(self) -> ProfileSummary:
        """Stop it: this rank's kernel times and wall time since start_profile."""
        return self.profiler.stop(self.rank, self.spec.device)

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _heartbeat(heartbeats, rank: int, parent_pid: int) -> None:
    """Stamp this rank's slot so the driver can tell a stopped rank from a waiting one; exit if
    the driver is gone (no orphaned worker)."""
    while True:
        heartbeats[rank] = time.time()
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(HEARTBEAT_INTERVAL_S)


def _read_requests(conn, requests: queue.SimpleQueue) -> None:
    """Move requests from the pipe to the queue as they arrive (None once the pipe closes), so the
    driver's sends of later steps never wait for this rank to finish the current one."""
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            requests.put(None)
            return
        requests.put(request)
        if request[0] == "shutdown":
            return


def worker_main(spec: WorkerSpec, conn, heartbeats, parent_pid: int) -> None:
    """A worker process: answer (method, args) requests on conn, in order, with ("ok", result)
    or ("error", message) until "shutdown" or the driver's end closes."""
    logging.basicConfig(
        level=spec.log_level, format=f"(rank {spec.rank}) %(levelname)s %(name)s: %(message)s"
    )
    threading.Thread(
        target=_heartbeat, args=(heartbeats, spec.rank, parent_pid), daemon=True
    ).start()
    requests: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_requests, args=(conn, requests), daemon=True).start()
    worker = Worker(spec)
    held: PendingSamples | None = None  # answered once the driver's next message arrives

    def run(what: str, fn, *fn_args):
        """fn(*fn_args), or the exception it raised (logged with its traceback)."""
        try:
            return fn(*fn_args)
        except Exception as e:
            logger.debug("rank %d: %s failed:\n%s", spec.rank, what, traceback.format_exc())
            return e

    def reply(value) -> None:
        if isinstance(value, Exception):
            conn.send(
                ("error", "".join(traceback.format_exception_only(type(value), value)).strip())
            )
        else:
            conn.send(("ok", value))

    while True:
        request = requests.get()
        if request is None:
            break
        method, args = request
        if method == "shutdown":  # a held answer nobody collects is dropped
            worker.shutdown()
            conn.send(("ok", None))
            break
        result = None if method == "flush" else run(method, getattr(worker, method), *args)
        if held is not None:  # the held step's answer, now that the next one is launched
            reply(run("execute", held.result))
            held = None
        if method == "flush":  # no step followed the held one: nothing more to answer
            continue
        if isinstance(result, PendingSamples):
            held = result
        else:
            reply(result)
    conn.close()
