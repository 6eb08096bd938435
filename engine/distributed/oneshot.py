"""Peer-mapped buffers for the one-shot all-reduce (`backends.triton.allreduce`) of a
tensor-parallel group on NVIDIA GPUs.

Each rank allocates one buffer (flag area + two halves of data) through torch symmetric memory,
which maps every rank's buffer into every other rank's address space (over NVLink / PCIe peer
access). The buffers are zeroed and the group synchronised before the first use; a first
all-reduce of known values checks the mapping (wrong sums or a timed-out wait turn the path
off, logged, and NCCL carries every call). Tried and dropped: mapping through CUDA IPC handles
(`torch.multiprocessing` reductions) faulted on 2 x H100 (illegal address in the first call).

The collectives use the kernel only while a CUDA graph is being captured (decode steps): a
Triton launch from Python costs ~20 us more than NCCL's, which only a graph removes (2 x H100:
eager 47-84 us against NCCL's 25-43; in a graph 8.6 against 14.6 us at 8 KiB).

Switches: HAL_ONESHOT_ALLREDUCE=0 turns it off; HAL_ONESHOT_ALLREDUCE_MAX_BYTES is the largest
tensor it takes (larger ones go to NCCL; default 4 MiB at 2 ranks, 512 KiB at more);
HAL_ONESHOT_LL_MAX_ROWS the most rows a call sends by the kernel's low-latency protocol (default
`allreduce.LL_MAX_ROWS`; 0: never).
"""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# The largest all-reduce the kernel takes by default, by group size: measured faster than NCCL
# in a graph up to 4 MiB at 2 ranks (2.4-3.3x on 2 x H200) and up to 512 KiB, the largest size
# measured, at 4 (1.6-2.2x on 4 x H200).
DEFAULT_MAX_BYTES = {2: 4 * 1024 * 1024}
DEFAULT_MAX_BYTES_LARGER = 512 * 1024
SELF_TEST_SPIN_LIMIT = 1 << 20


def enabled() -> bool:
    return os.environ.get("HAL_ONESHOT_ALLREDUCE", "1") != "0"


def _int_env(name: str, default: int, least: int, unit: str, rule: str) -> int:
    """The integer in environment variable `name` (default when unset), at least `least`
    (`rule` says so in the error)."""
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}: {raw!r} is not an integer ({unit})") from None
    if value < least:
        raise ValueError(f"{name}: {value} must be {rule}")
    return value


def gemm_push() -> bool:
    """Whether a row-parallel GEMM pushes its output as the next LL all-reduce's words
    (`HAL_ONESHOT_GEMM_PUSH=0`: the all-reduce sends them itself)."""
    return os.environ.get("HAL_ONESHOT_GEMM_PUSH", "1") != "0"


def ll_max_rows(default: int) -> int:
    return _int_env("HAL_ONESHOT_LL_MAX_ROWS", default, 0, "rows", ">= 0 (0: never)")


def max_bytes(world: int) -> int:
    default = DEFAULT_MAX_BYTES.get(world, DEFAULT_MAX_BYTES_LARGER)
    return _int_env("HAL_ONESHOT_ALLREDUCE_MAX_BYTES", default, 1, "bytes", "> 0")


def unavailable_reason(backend, device: torch.device, world: int = 1) -> str | None:
    """Why the one-shot path cannot run with `backend` on `device` in a group of `world` ranks
    (None when it can be tried)."""
    if not enabled():
        return "HAL_ONESHOT_ALLREDUCE=0"
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    why = backend.peer_all_reduce_reason()
    if why is not None:
        return why
    # Reading a peer GPU's memory needs that GPU visible here (the mp executor shows every
    # worker all of them; Ray gives each worker one).
    visible = torch.cuda.device_count()
    if visible < world:
        return f"this process sees {visible} GPU(s), fewer than the group's {world} ranks"
    return None


def _map_symmetric(total: int, device: torch.device, group) -> tuple[list, list[int]]:
    import torch.distributed._symmetric_memory as symm_mem

    name = (group if group is not None else dist.group.WORLD).group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        symm_mem.enable_symm_mem_for_group(name)
    buf = symm_mem.empty(total, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(buf, name)
    return [buf, handle], [int(p) for p in handle.buffer_ptrs]


def build_workspace(backend, group, capacity_bytes: int | None = None):
    """This rank's one-shot workspace (`backend.make_peer_all_reduce`) over `group` (None = the
    default group), or None with the reason logged. Collective: every rank of the group calls
    it at the same point."""
    device = torch.device(backend.device)
    world = dist.get_world_size(group)
    why = unavailable_reason(backend, device, world)
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    if why is None and len(set(hosts)) > 1:
        why = f"the group spans {len(set(hosts))} hosts (peer mapping needs one)"
    # Every rank must take the same branch: agree on whether all of them can try.
    ok = torch.tensor([0 if why else 1], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if not int(ok.item()):
        logger.info("one-shot all-reduce off: %s", why or "another rank cannot run it")
        return None
    capacity = capacity_bytes or max_bytes(world)
    capacity = -(-capacity // 256) * 256
    max_programs = min(64, torch.cuda.get_device_properties(device).multi_processor_count)
    total = backend.peer_all_reduce_buffer_bytes(world, capacity, max_programs)
    try:
        keep, ptrs = _map_symmetric(total, device, group)
    except Exception as exc:  # noqa: BLE001 - any failure means: NCCL carries every call
        logger.info("one-shot all-reduce: torch symmetric memory failed: %s", exc)
        keep, ptrs = None, None
    ok.fill_(1 if ptrs is not None else 0)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if not int(ok.item()):
        logger.info("one-shot all-reduce off: no rank-to-rank mapping of the buffers")
        return None
    keep[0].zero_()
    torch.cuda.synchronize(device)
    dist.barrier(group=group)
    rank = dist.get_rank(group)
    ws = backend.make_peer_all_reduce(rank, world, ptrs, capacity, max_programs)
    ws.ll_max_rows = ll_max_rows(ws.ll_max_rows)
    ws.gemm_push = gemm_push()
    ws.keepalive = keep  # the buffers (and the peers' mappings) live as long as the workspace
    if not _self_test(ws, rank, world, device, group):
        return None
    logger.info(
        "one-shot all-reduce on (in CUDA graphs): %d ranks, up to %d bytes a call, %d programs, "
        "low-latency protocol up to %d rows%s", world, capacity, max_programs, ws.ll_max_rows,
        ", pushed by the GEMM before it" if ws.gemm_push else "",
    )  # fmt: skip
    return ws


def _self_test(ws, rank: int, world: int, device: torch.device, group) -> bool:
    """First calls on known values (rank + 1 in every element, both halves of the buffer, by
    both protocols where the workspace takes them); the group agrees on the outcome."""
    expect = world * (world + 1) / 2
    good = True
    # A mapping that does not carry writes would leave the waits spinning: give up sooner here
    # (~1 s) than in service.
    ws.spin_limit, spin_limit = SELF_TEST_SPIN_LIMIT, ws.spin_limit
    shapes = [(3, 256), (ws.ll_max_rows + 1, 256)]  # low-latency (unless off), flag-and-read
    for shape in [s for s in shapes if ws.fits(torch.empty(s, device=device))] * 2:
        x = torch.full(shape, float(rank + 1), dtype=torch.float32, device=device)
        y = ws.all_reduce(x)
        good &= bool((y == expect).all().item())
        try:
            ws.check()
        except RuntimeError:
            good = False
    ws.spin_limit = spin_limit
    ok = torch.tensor([1 if good else 0], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if not int(ok.item()):
        logger.warning("one-shot all-reduce off: its self-test gave wrong sums on some rank")
        return False
    return True
