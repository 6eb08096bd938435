"""LoRA adapters served on one base model (vLLM's multi-LoRA): `LoRARequest`, the PEFT adapter
loader, the per-layer slot buffers and the manager that keeps adapters resident.

An adapter is a PEFT folder: adapter_config.json (r, lora_alpha, target_modules, use_rslora)
and adapter_model.safetensors (or .bin) with `...layers.{i}.{self_attn|mlp}.{module}.lora_A
.weight` [r, in] and `lora_B.weight` [out, r]. A targeted linear computes
y = x W^T + scaling (x A^T) B^T, scaling = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora); the scaling is folded into B at load.

Serving: the engine holds `max_loras` slots. Every linear layer an adapter can target keeps,
per slot, the adapter's A and B (zero-padded to `max_lora_rank`; a slot no adapter uses is all
zeros) stacked, and the backend's `lora_add` gives every token its own slot's delta, y +=
B_s (A_s x), and a token without an adapter none (the reference: two GEMMs over all slots with
the other slots' columns masked to exact zeros; the GPU backends read only each token's own
slot for decode-sized steps, `backends.triton.lora`). A request's
adapter is made resident when the request is admitted; while every slot holds an adapter with
unfinished requests, later adapter requests wait (in arrival order) until one frees.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from hal.backend import LoRABatch

logger = logging.getLogger(__name__)

# The projections an adapter may target (Llama-family names), by the layer that runs them.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
    r"lora_([AB])(?:\.default)?\.weight$"
)
_SUBLAYER = {name: "self_attn" for name in TARGETS[:4]} | {name: "mlp" for name in TARGETS[4:]}


class LoRAError(ValueError):
    """An adapter that cannot be served: a bad folder, config, tensor or size."""


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest: serve a request through the adapter at lora_path. lora_int_id (>= 1)
    identifies the adapter in the engine: requests with the same id share its resident copy."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name: expected a non-empty string, got {self.lora_name!r}")
        i = self.lora_int_id
        if not isinstance(i, int) or isinstance(i, bool) or i < 1:
            raise ValueError(f"lora_int_id: expected an integer >= 1, got {i!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path: expected the adapter's folder, got {self.lora_path!r}")


@dataclass
class LoRAAdapter:
    """An adapter read from disk: per (layer, module) its A [r, in] and scaled B [out, r], in
    float32 on the CPU (copied into slots in the model's dtype when it becomes resident)."""

    request: LoRARequest
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def _expected_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of each target projection of the full (unsharded) model."""
    h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}  # fmt: skip


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    st, pt = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise LoRAError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")


def load_adapter(request: LoRARequest, config, max_lora_rank: int) -> LoRAAdapter:
    """Read and check the PEFT adapter at request.lora_path against the base model's config:
    every error names the file, tensor or setting and what is supported."""
    folder = Path(request.lora_path)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise LoRAError(f"LoRA {request.lora_name!r}: {cfg_path} not found (a PEFT adapter folder)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{cfg_path}: not JSON ({e})") from e
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoRAError(f"{cfg_path}: r={rank!r}, expected an integer >= 1")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise LoRAError(f"{cfg_path}: lora_alpha={alpha!r}, expected a number")
    if rank > max_lora_rank:
        raise LoRAError(
            f"{cfg_path}: rank r={rank} exceeds max_lora_rank={max_lora_rank}; start the engine "
            f"with max_lora_rank >= {rank}"
        )
    unsupported = {
        "bias": (cfg.get("bias", "none") or "none") != "none",
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "use_dora": bool(cfg.get("use_dora")),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
    }
    for key, bad in unsupported.items():
        if bad:
            raise LoRAError(
                f"{cfg_path}: {key}={cfg.get(key)!r} is not supported (LoRA on the projections "
                f"{', '.join(TARGETS)} only, one rank and alpha, no bias or saved modules)"
            )
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    shapes = _expected_shapes(config)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in _read_tensors(folder).items():
        m = _KEY.match(name)
        if m is None:
            raise LoRAError(
                f"{folder}: tensor {name!r} is not a LoRA A/B weight of a Llama projection "
                f"({', '.join(TARGETS)}; embeddings and the LM head are not supported)"
            )
        layer, sub, module, which = int(m[1]), m[2], m[3], m[4]
        if module not in TARGETS or _SUBLAYER[module] != sub:
            raise LoRAError(f"{folder}: tensor {name!r} targets {sub}.{module}; supported: "
                            f"{', '.join(TARGETS)}")  # fmt: skip
        if layer >= config.num_layers:
            raise LoRAError(f"{folder}: tensor {name!r} is for layer {layer}; the model has "
                            f"{config.num_layers}")  # fmt: skip
        out, inp = shapes[module]
        want = (rank, inp) if which == "A" else (out, rank)
        if tuple(tensor.shape) != want:
            raise LoRAError(
                f"{folder}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {want} "
                f"(r={rank}, {module} of this model: {out} x {inp})"
            )
        if not tensor.is_floating_point():
            raise LoRAError(f"{folder}: tensor {name!r} is {tensor.dtype}, not floating point")
        pairs.setdefault((layer, module), {})[which] = tensor.float()
    weights = {}
    for key, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise LoRAError(f"{folder}: layer {key[0]} {key[1]} has no {missing} weight")
        weights[key] = (ab["A"].contiguous(), (ab["B"] * scaling).contiguous())
    if not weights:
        raise LoRAError(f"{folder}: no LoRA weights found")
    return LoRAAdapter(request, rank, scaling, weights)


class LoRASlots:
    """One linear layer's slot buffers. parts: (module, the part's rows in this layer's output,
    the rows of the full projection this rank holds) for column-parallel layers, or for a
    row-parallel one a single part whose input columns this rank holds (`in_range`).

    a [P * S * R, in_local] stacks every part's A for every slot (part p, slot s: rows
    (p * S + s) * R ..., the first r of them used); b [out_local, P * S * R] is block-diagonal:
    a part's output rows read only its own columns (`hal.backend.Backend.lora_add`'s layout)."""

    def __init__(self, context: LoRAContext, layer: int, parts, in_size: int,
                 in_range: tuple[int, int] | None, backend, dtype) -> None:  # fmt: skip
        self.context, self.layer, self.parts, self.in_range = context, layer, parts, in_range
        self.backend = backend
        self.out_parts = tuple((rows.start, rows.stop) for _, rows, _ in parts)
        width = len(parts) * context.max_loras * context.max_rank
        in_local = in_size if in_range is None else in_range[1] - in_range[0]
        out_local = max(rows.stop for _, rows, _ in parts)
        self.a = torch.zeros(width, in_local, device=backend.device, dtype=dtype)
        self.b = torch.zeros(out_local, width, device=backend.device, dtype=dtype)

    def load(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Fill `slot` with the adapter's weights for this layer (zeros where it has none)."""
        r, s = self.context.max_rank, self.context.max_loras
        for p, (module, out_rows, full_rows) in enumerate(self.parts):
            cols = slice((p * s + slot) * r, (p * s + slot + 1) * r)
            self.a[cols].zero_()
            self.b[out_rows, cols].zero_()
            w = None if adapter is None else adapter.weights.get((self.layer, module))
            if w is None:
                continue
            a, b = w
            if self.in_range is not None:
                a = a[:, self.in_range[0] : self.in_range[1]]
            b = b[full_rows[0] : full_rows[1]]
            self.a[cols.start : cols.start + a.shape[0]].copy_(a)
            self.b[out_rows, cols.start : cols.start + b.shape[1]].copy_(b)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + this step's LoRA deltas of x, in place (y unchanged when no token of the step
        has an adapter), by the backend's `lora_add`. Row-parallel: x is this rank's input
        columns and the delta a partial sum, like y."""
        batch = self.context.batch
        if batch is None:
            return y
        lead = y.shape[:-1]
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        out = self.backend.lora_add(x2, y2, self.a, self.b, batch, self.out_parts)
        return out.reshape(*lead, out.shape[-1])


class LoRAContext:
    """What every layer's slots share: sizes, and this step's adapters (`hal.backend.LoRABatch`:
    each token's slot; None when no token of the step has an adapter)."""

    def __init__(self, max_loras: int, max_rank: int) -> None:
        self.max_loras, self.max_rank = max_loras, max_rank
        self.batch: LoRABatch | None = None

    def batch_for(self, token_slots: torch.Tensor) -> LoRABatch:
        """A step's batch over `token_slots` (int32 [T] on the model's device)."""
        return LoRABatch(token_slots, self.max_loras, self.max_rank)


def attach_slots(model, max_loras: int, max_rank: int) -> tuple[LoRAContext, list[LoRASlots]]:
    """Give each target linear of `model` (a LlamaForCausalLM) its slot buffers; returns the
    shared context and every layer's slots."""
    context = LoRAContext(max_loras, max_rank)
    backend, dtype = model.backend, model.dtype
    all_slots = []
    for i, layer in zip(range(model.layer_start, model.layer_stop), model.layers, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = attn.qkv_proj
        q_rows, kv_rows = qkv.q_rows, qkv.kv_rows
        parts = [("q_proj", slice(0, qkv.q_size), q_rows),
                 ("k_proj", slice(qkv.q_size, qkv.q_size + qkv.kv_size), kv_rows),
                 ("v_proj", slice(qkv.q_size + qkv.kv_size, qkv.q_size + 2 * qkv.kv_size),
                  kv_rows)]  # fmt: skip
        qkv.lora = LoRASlots(context, i, parts, qkv.hidden_size, None, backend, dtype)
        gu = mlp.gate_up_proj
        offset, parts = 0, []
        for module, (start, stop) in zip(("gate_proj", "up_proj"), gu.ranges, strict=True):
            parts.append((module, slice(offset, offset + stop - start), (start, stop)))
            offset += stop - start
        gu.lora = LoRASlots(context, i, parts, gu.input_size, None, backend, dtype)
        for module, row in (("o_proj", attn.o_proj), ("down_proj", mlp.down_proj)):
            parts = [(module, slice(0, row.output_size), (0, row.output_size))]
            row.lora = LoRASlots(context, i, parts, row.input_size, (row.col_start, row.col_stop),
                                 backend, dtype)  # fmt: skip
        all_slots += [qkv.lora, gu.lora, attn.o_proj.lora, mlp.down_proj.lora]
    model._gguf_stack = None  # a fused stack built before would skip the deltas
    model.lora_context = context  # where graph captures find the step's slots (engine.graphs)
    return context, all_slots


@dataclass(frozen=True)
class StepLoRA:
    """What a step's model runs need of the adapters (sent to every rank with the step):
    adapters to load into slots first, and each scheduled sequence's slot (-1: none) and token
    count, in packing order."""

    loads: tuple[tuple[int, LoRARequest], ...]
    slots: tuple[int, ...]
    counts: tuple[int, ...]


class LoRAManager:
    """The driver's side: adapters known to the engine (read and checked once per
    lora_int_id), which are resident in which slot, how many unfinished requests each resident
    one serves, and the slot loads not yet sent to the model runs (`step_lora`)."""

    def __init__(self, model_config, max_loras: int, max_rank: int) -> None:
        if not isinstance(max_loras, int) or isinstance(max_loras, bool) or max_loras < 1:
            raise ValueError(f"max_loras: {max_loras!r} must be an integer >= 1")
        if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1:
            raise ValueError(f"max_lora_rank: {max_rank!r} must be an integer >= 1")
        self.model_config = model_config
        self.max_loras, self.max_rank = max_loras, max_rank
        self.adapters: dict[int, LoRAAdapter] = {}
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # resident id -> slot, LRU first
        self.users: dict[int, int] = {}  # resident id -> unfinished requests admitted with it
        self._loads: list[tuple[int, LoRARequest]] = []  # made resident, not yet sent
        self._forgotten: set[int] = set()  # to drop once their last request finishes

    def register(self, request: LoRARequest, adapter: LoRAAdapter | None = None) -> LoRAAdapter:
        """The adapter of `request`, read and checked on first use of its id (or given, read
        already by `load_adapter`)."""
        known = self.adapters.get(request.lora_int_id)
        if known is not None:
            if known.request.lora_path != request.lora_path:
                raise LoRAError(
                    f"lora_int_id {request.lora_int_id} is already {known.request.lora_name!r} "
                    f"at {known.request.lora_path}; give {request.lora_path} another id"
                )
            return known
        if adapter is None:
            adapter = load_adapter(request, self.model_config, self.max_rank)
        self.adapters[request.lora_int_id] = adapter
        self._forgotten.discard(request.lora_int_id)
        logger.info("LoRA %r (id %d): rank %d, %d projections, from %s", request.lora_name,
                    request.lora_int_id, adapter.rank, len(adapter.weights),
                    request.lora_path)  # fmt: skip
        return adapter

    def can_admit(self, lora_id: int) -> bool:
        """Whether a request of this adapter can run now: resident, or a slot is free or held
        by an adapter with no unfinished requests."""
        if lora_id in self.slot_of or len(self.slot_of) < self.max_loras:
            return True
        return any(self.users.get(i, 0) == 0 for i in self.slot_of)

    def acquire(self, lora_id: int) -> int:
        """Count one more request of this adapter, making it resident if it is not (the least
        recently used idle adapter gives up its slot; the load goes with the next step);
        returns its slot."""
        if lora_id not in self.slot_of:
            if not self.can_admit(lora_id):
                raise RuntimeError(f"LoRA id {lora_id}: no slot free (check can_admit first)")
            if len(self.slot_of) < self.max_loras:
                slot = min(set(range(self.max_loras)) - set(self.slot_of.values()))
            else:
                idle = next(i for i in self.slot_of if self.users.get(i, 0) == 0)
                slot = self.slot_of.pop(idle)
                self.users.pop(idle, None)
            self._loads.append((slot, self.adapters[lora_id].request))
            self.slot_of[lora_id] = slot
        self.slot_of.move_to_end(lora_id)
        self.users[lora_id] = self.users.get(lora_id, 0) + 1
        return self.slot_of[lora_id]

    def release(self, lora_id: int) -> None:
        """One request of this adapter finished (its slot may be reused once none is left)."""
        n = self.users.get(lora_id, 0)
        if n < 1:
            raise RuntimeError(f"LoRA id {lora_id}: released more often than acquired")
        self.users[lora_id] = n - 1
        if n == 1 and lora_id in self._forgotten:
            self.forget(lora_id)

    def forget(self, lora_id: int) -> None:
        """Drop an adapter (a server unloading it): its slot and weights go once no
        unfinished request uses it; a request naming it later reads it again."""
        if self.users.get(lora_id, 0) > 0:
            self._forgotten.add(lora_id)
            return
        self._forgotten.discard(lora_id)
        self.adapters.pop(lora_id, None)
        self.slot_of.pop(lora_id, None)
        self.users.pop(lora_id, None)
        self._loads = [(s, r) for s, r in self._loads if r.lora_int_id != lora_id]

    def step_lora(self, scheduled) -> StepLoRA | None:
        """The StepLoRA of a step's scheduled sequences (the pending loads go with it); None
        when no sequence has an adapter and nothing is to be loaded."""
        slot_of = self.slot_of
        slots = tuple(
            -1 if (i := ss.seq.request.lora_int_id) is None else slot_of[i] for ss in scheduled
        )
        if not self._loads and all(s < 0 for s in slots):
            return None
        loads, self._loads = tuple(self._loads), []
        return StepLoRA(loads, slots, tuple(ss.num_new_tokens for ss in scheduled))


class LoRAWeights:
    """Where the model runs (the engine's process, or each rank with its shard of the layers):
    the slot buffers on the model's layers, filled as steps' loads say, and each step's token
    slots.
    reader(request) -> LoRAAdapter gives an adapter's weights (default: read from its folder,
    each time a slot takes it; in the engine's process the LoRAManager's copy)."""

    def __init__(self, model, max_loras: int, max_rank: int, reader=None) -> None:
        self.max_loras, self.max_rank = max_loras, max_rank
        self.context, self.slots = attach_slots(model, max_loras, max_rank)
        self.device, self.dtype = model.backend.device, model.dtype
        config = model.config  # a rank reads an adapter each time one of its slots takes it
        self.reader = reader or (lambda request: load_adapter(request, config, max_rank))

    @property
    def nbytes(self) -> int:
        """Device bytes of the slot buffers."""
        return sum(t.numel() * t.element_size() for s in self.slots for t in (s.a, s.b))

    def begin(self, step: StepLoRA | None) -> None:
        """Load the step's adapters into their slots, then set its tokens' slots."""
        if step is None:
            self.context.batch = None
            return
        for slot, request in step.loads:
            adapter = self.reader(request)
            for s in self.slots:
                s.load(slot, adapter)
        if all(s < 0 for s in step.slots):
            self.context.batch = None
            return
        token_slots = torch.repeat_interleave(
            torch.tensor(step.slots, dtype=torch.int32), torch.tensor(step.counts)
        )
        self.context.batch = self.context.batch_for(token_slots.to(self.device, non_blocking=True))

    def end(self) -> None:
        self.context.batch = None
