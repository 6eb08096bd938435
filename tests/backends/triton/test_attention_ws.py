"""The warp-specialized decode kernels (backends/triton/attention_ws.py and its persistent variant,
attention_ws_persistent.py): which calls take them and why the others do not, the split and
persistent rules, an offline sm_90 build of each, and (on an NVIDIA GPU of compute capability 9.0
or newer with Gluon) their outputs against the float64 CPU reference through `attention`, split
or whole, partial last pages, every group size they take, both page sizes and head dims, a
persistent grid far smaller than the batch, and under CUDA graph capture. Gluon kernels have no
interpreter: without such a GPU only the rules and the offline builds run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from backends.triton import attention_ws as ws  # noqa: E402
from backends.triton import attention_ws_persistent as wsp  # noqa: E402

GPU = (
    torch.cuda.is_available()
    and torch.version.hip is None
    and ws.HAVE_GLUON
    and torch.cuda.get_device_capability() >= (9, 0)
)
gpu_only = pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU (sm_90+) with Gluon")


def test_split_rule() -> None:
    # Whole below 64 pages or from half a program per SM; else two programs per SM, each split
    # at least 4 pages, at most 128 splits.
    assert ws.num_splits(8, 512, 16, 132) == 1  # 32 pages
    assert ws.num_splits(8, 1024, 16, 132) == 16  # 64 pages / 4
    assert ws.num_splits(8, 32768, 16, 132) == 33  # 2 x 132 / 8
    assert ws.num_splits(32, 8192, 16, 132) == 8
    assert ws.num_splits(67, 8192, 16, 132) == 1  # more than half an SM each
    assert ws.num_splits(1, 1 << 20, 16, 132) == ws.MAX_SPLITS
    assert ws.num_splits(2, 2048, 32, 132) == 16  # 64 pages of 32 tokens


def test_route(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past one program per SM the persistent kernel; below, unsplit ranges of 4096 tokens or more
    # too; the rest this module's kernel.
    assert ws.route(133, 512, 16, 132) == ws.route(2048, 64, 16, 132) == "persistent"
    assert ws.route(128, 4096, 16, 132) == ws.route(128, 32768, 16, 132) == "persistent"
    assert ws.route(128, 1024, 16, 132) == "ws"  # 16 x 1024
    assert ws.route(8, 32768, 16, 132) == "ws"  # split instead
    assert ws.route(132, 4095, 16, 132) == "ws"
    # HAL_ATTN_WS_PERSISTENT=0: wide batches back to the Triton kernel, long ranges to this one.
    monkeypatch.setattr(ws, "PERSISTENT_ENABLED", False)
    assert ws.route(133, 512, 16, 132) == "triton"
    assert ws.route(128, 32768, 16, 132) == "ws"


def test_ring_slots_are_a_multiple_of_the_consumers() -> None:
    assert wsp.stages_for(16, 128, 2) == 12
    assert wsp.stages_for(32, 128, 2) == 8
    assert wsp.stages_for(16, 64, 2) == wsp.stages_for(32, 64, 2) == 12
    for page in (16, 32):
        for head_dim in (64, 128):
            assert wsp.stages_for(page, head_dim, 2) % ws.CONSUMERS == 0


def test_device_reason_names_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ws, "ENABLED", False)
    assert ws.device_reason(True) == "HAL_ATTN_WS=0"
    monkeypatch.setattr(ws, "ENABLED", True)
    monkeypatch.setattr(ws, "HAVE_GLUON", False)
    assert ws.device_reason(True) == "this Triton has no Gluon"
    monkeypatch.setattr(ws, "HAVE_GLUON", True)
    monkeypatch.setattr(ws, "interpreting", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert ws.device_reason(False) == "compute capability below 9.0 (no TMA)"
    assert ws.device_reason(True) is None
    monkeypatch.setattr(ws, "interpreting", lambda: True)
    assert ws.device_reason(True) == "not an NVIDIA GPU (or the interpreter)"


def test_cpu_tensors_are_refused() -> None:
    q = torch.zeros(2, 8, 128, dtype=torch.bfloat16)
    cache = torch.zeros(4, 16, 2, 128, dtype=torch.bfloat16)
    assert ws.call_reason(q, cache, cache, 2, None, None, None, 1) == "not a CUDA tensor"


def test_cuda_backend_says_which_decode_kernel_runs() -> None:
    from backends.cuda.backend import CudaBackend
    from hal.capabilities import LibraryInfo
    from tests.backends.cuda.test_candidates import nvidia

    for cc in ((9, 0), (8, 0)):
        backend = CudaBackend(nvidia(cc, libraries={"triton": LibraryInfo("triton", "3.6", True)}))
        assert backend.chosen("attention") == "triton"
        why = ws.device_reason(cc >= (9, 0))
        setting = backend.info.settings["attention_decode"]
        if why is None:
            assert setting.startswith("gluon warp-specialized"), setting
            assert "persistent past one program per SM" in setting, setting
        else:
            assert setting == f"triton (warp-specialized off: {why})"


OFFLINE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from backends.triton import attention_ws as ws

fn = ws._ws_decode_kernel
layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
desc = f"tensordesc<bf16[16, 128],{layout!r}>"
types = {"q_ptr": "*bf16", "k_desc": desc, "v_desc": desc, "out_ptr": "*bf16",
         "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "bt_ptr": "*i32",
         "seq_lens_ptr": "*i32", "s_scale": "fp32"}
out = {}
for split, early in ((False, False), (True, False), (False, True), (True, True)):
    consts = dict(PAGE=16, HEAD_DIM=128, STAGES=ws.STAGES, NC=ws.CONSUMERS, SPLIT=split,
                  CONSUMER_REGS=ws.CONSUMER_REGS, EARLY=early, PDL=True)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    src = gluon._runtime.GluonASTSource(
        fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in types if "ptr" in n})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=4, maxnreg=ws.MAX_REGS)).asm["ptx"]
    out[f"{split}-{early}"] = [w for w in ("cp.async.bulk.tensor", "mma.sync.aligned.m16n8k16",
                                   "setmaxnreg", "griddepcontrol.wait") if w in ptx]
print(json.dumps(out))
"""


@pytest.mark.skipif(not ws.HAVE_GLUON, reason="this Triton has no Gluon")
def test_compiles_for_sm90_offline() -> None:
    # The installed Triton builds the kernel for an H100 / H200 without a GPU (its bundled
    # ptxas, in a fresh interpreter-free process), whole and split, with the pages before the
    # PDL wait (EARLY_PAGES) and without: TMA page copies, mma.sync dots, the partitions'
    # register reallocation and the PDL wait are there.
    from tests.backends.triton.test_pipeline_stages import run_offline

    found = run_offline(OFFLINE)
    everything = ["cp.async.bulk.tensor", "mma.sync.aligned.m16n8k16", "setmaxnreg",
                  "griddepcontrol.wait"]  # fmt: skip
    assert found == {f"{s}-{e}": everything for s in (False, True) for e in (False, True)}


OFFLINE_PERSISTENT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from backends.triton import attention_ws as ws
from backends.triton import attention_ws_persistent as wsp

fn = wsp._ws_persistent_kernel
layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
out = {}
for page in (16, 32):
    desc = f"tensordesc<bf16[{page}, 128],{layout!r}>"
    types = {"q_ptr": "*bf16", "k_desc": desc, "v_desc": desc, "out_ptr": "*bf16",
             "bt_ptr": "*i32", "seq_lens_ptr": "*i32", "s_scale": "fp32"}
    consts = dict(PAGE=page, HEAD_DIM=128, STAGES=wsp.stages_for(page, 128, 2), NC=ws.CONSUMERS,
                  CONSUMER_REGS=wsp.CONSUMER_REGS, PDL=True)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    src = gluon._runtime.GluonASTSource(
        fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in types if "ptr" in n})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4, maxnreg=wsp.MAX_REGS))
    ptx = k.asm["ptx"]
    out[str(page)] = {
        "found": [w for w in ("cp.async.bulk.tensor", "mma.sync.aligned.m16n8k16", "setmaxnreg",
                              "griddepcontrol.wait") if w in ptx],
        "arrives": sum("mbarrier.arrive" in line for line in ptx.splitlines()),
        "shared": k.metadata.shared,
    }
print(json.dumps(out))
"""


@pytest.mark.skipif(not ws.HAVE_GLUON, reason="this Triton has no Gluon")
def test_persistent_compiles_for_sm90_offline() -> None:
    # Both page sizes build for sm_90 within one SM's shared memory (227 KB a program), with the
    # TMA copies, mma.sync dots, register reallocation and PDL wait; each partition arrives on its
    # barriers in exactly one place (the consumers: "empty" and "done", the folder: "free", the
    # producer: its arrive-with-expected-bytes on "ready").
    from tests.backends.triton.test_pipeline_stages import run_offline

    found = run_offline(OFFLINE_PERSISTENT)
    everything = ["cp.async.bulk.tensor", "mma.sync.aligned.m16n8k16", "setmaxnreg",
                  "griddepcontrol.wait"]  # fmt: skip
    for page in ("16", "32"):
        assert found[page]["found"] == everything, found
        assert found[page]["arrives"] == 2 * ws.CONSUMERS + 2, found
        assert found[page]["shared"] <= 227 * 1024, found


def test_a_kernel_that_does_not_build_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Triton whose Gluon cannot build the kernel: the call says why and the decode path keeps
    # the Triton kernel from then on (tdecode records the reason in attention_ws.BROKEN).
    monkeypatch.setattr(ws, "BROKEN", "CompilationError: test")
    assert ws.device_reason(True) == "the kernel did not build here (CompilationError: test)"


if GPU:
    from backends.triton import attention as tattn
    from backends.triton import attention_decode as tdecode
    from tests.backends.triton.test_attention_splitkv import batch, run_and_check


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The split counts of the calls that took the warp-specialized kernel."""
    calls: list[int] = []
    real = ws.decode

    def decode(*a, **k):
        calls.append(a[-1])
        return real(*a, **k)

    monkeypatch.setattr(ws, "decode", decode)
    return calls


def _spy_persistent(monkeypatch: pytest.MonkeyPatch, sms: int | None = None) -> list[int]:
    """The batch sizes of the calls that took the persistent kernel; sms: pretend the GPU has
    that many SMs (the rule's and the grid's count), so a small batch walks many items a program."""
    calls: list[int] = []
    real = wsp.decode

    def decode(*a, **k):
        calls.append(a[0].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(wsp, "decode", decode)
    if sms is not None:
        monkeypatch.setattr(tdecode, "_sm_count", lambda device: sms)
        monkeypatch.setattr(wsp, "_sm_count", lambda device: sms)
    return calls


# (seed, dtype, head_dim, block_size, gqa_ratio, num_kv_heads, seq_lens, max_seq_len, split)
CASES = [
    (1, "bf16", 128, 16, 4, 2, (1, 97, 40, 16, 73), 97, False),
    (2, "fp16", 64, 32, 8, 1, (200, 33, 64), 200, False),
    (3, "bf16", 128, 16, 16, 1, (150, 1), 150, False),
    (4, "fp16", 128, 16, 1, 4, (31, 17, 160), 160, False),
    (5, "bf16", 64, 16, 2, 3, (1000, 300, 17), 4096, True),  # 44 splits in the grid, fewer used
    (6, "fp16", 128, 32, 4, 2, (5000,), 5000, True),  # one long sequence
    (7, "bf16", 128, 16, 4, 8, (2047, 2048, 2049), 2049, True),
]


@gpu_only
@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
def test_matches_reference(monkeypatch: pytest.MonkeyPatch, case: tuple) -> None:
    seed, dtype, head_dim, block_size, gqa, kv_heads, seq_lens, max_seq_len, split = case
    calls = _spy(monkeypatch)
    c = batch(seed, dtype, seq_lens, (1,) * len(seq_lens), head_dim=head_dim,
              block_size=block_size, gqa_ratio=gqa, num_kv_heads=kv_heads)  # fmt: skip
    run_and_check(c, tattn.attention, max_query_len=1, max_seq_len=max_seq_len)
    sms = tdecode._sm_count(torch.device("cuda"))
    assert calls == [ws.num_splits(len(seq_lens) * kv_heads, max_seq_len, block_size, sms)]
    assert (calls[0] > 1) == split


# (seed, dtype, head_dim, block_size, gqa_ratio, num_kv_heads, seq_lens, SMs pretended)
PERSISTENT_CASES = [
    (31, "bf16", 128, 16, 4, 2, (1, 97, 40, 16, 73), 3),  # 10 items on 3 programs
    (32, "fp16", 64, 32, 8, 1, (200, 33, 64, 5), 2),
    (33, "bf16", 128, 16, 16, 1, (150, 1, 300), 2),
    (34, "fp16", 128, 16, 1, 4, (31, 17, 160), 5),
    (35, "bf16", 128, 32, 4, 2, (1000, 300, 17, 64, 5), 4),  # 8 ring slots
    (36, "bf16", 128, 16, 4, 4, tuple(range(7, 2000, 50)), None),  # 160 items, the real SMs
]


@gpu_only
@pytest.mark.parametrize("case", PERSISTENT_CASES, ids=[str(c[0]) for c in PERSISTENT_CASES])
def test_persistent_matches_reference(monkeypatch: pytest.MonkeyPatch, case: tuple) -> None:
    seed, dtype, head_dim, block_size, gqa, kv_heads, seq_lens, sms = case
    calls, per_program = _spy_persistent(monkeypatch, sms), _spy(monkeypatch)
    c = batch(seed, dtype, seq_lens, (1,) * len(seq_lens), head_dim=head_dim,
              block_size=block_size, gqa_ratio=gqa, num_kv_heads=kv_heads)  # fmt: skip
    run_and_check(c, tattn.attention, max_query_len=1, max_seq_len=max(seq_lens))
    assert calls == [len(seq_lens)] and per_program == []


@gpu_only
def test_persistent_captures_in_a_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 items on 3 programs, captured and replayed on new queries: an eager call's bits.
    calls = _spy_persistent(monkeypatch, sms=3)
    case = batch(22, "bf16", (300, 1000, 64, 7), (1,) * 4, block_size=16, head_dim=128)
    t = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.build().items()}
    args = (t["query"], t["key_cache"], t["value_cache"], t["block_tables"], t["seq_lens"],
            t["query_start_loc"], t["scale"])  # fmt: skip
    tattn.attention(*args, max_query_len=1, max_seq_len=1000)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tattn.attention(*args, max_query_len=1, max_seq_len=1000)
    for _ in range(2):
        t["query"].copy_(torch.randn_like(t["query"]))
        graph.replay()
        torch.cuda.synchronize()
        eager = tattn.attention(*args, max_query_len=1, max_seq_len=1000)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert calls == [4] * 4


@gpu_only
def test_splits_agree_with_one_split(monkeypatch: pytest.MonkeyPatch) -> None:
    c = batch(11, "bf16", (900, 64, 400), (1, 1, 1), head_dim=128, block_size=16)
    calls = _spy(monkeypatch)
    whole = run_and_check(c, tattn.attention, max_query_len=1, max_seq_len=900)
    monkeypatch.setattr(ws, "SPLIT_MIN_PAGES", 1)
    split = run_and_check(c, tattn.attention, max_query_len=1, max_seq_len=900)
    assert calls[0] == 1 and calls[1] > 1
    torch.testing.assert_close(split, whole, rtol=0.02, atol=0.02)


@gpu_only
def test_other_calls_keep_the_triton_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, persistent = _spy(monkeypatch), _spy_persistent(monkeypatch)
    lens = (40, 17, 5)
    run_and_check(batch(3, "bf16", lens, (1, 1, 1), block_size=8), tattn.attention,
                  max_query_len=1)  # fmt: skip
    run_and_check(batch(3, "bf16", lens, (1, 1, 1), block_size=16, head_dim=80), tattn.attention,
                  max_query_len=1)  # fmt: skip
    run_and_check(batch(3, "bf16", lens, (1, 1, 1), block_size=16, sliding_window=9),
                  tattn.attention, max_query_len=1)  # fmt: skip
    run_and_check(batch(3, "bf16", lens, (1, 1, 1), block_size=16, soft_cap=30.0),
                  tattn.attention, max_query_len=1)  # fmt: skip
    run_and_check(batch(3, "bf16", lens, (1, 1, 1), "fp8_e4m3fn", block_size=16),
                  tattn.attention, max_query_len=1)  # fmt: skip
    run_and_check(batch(3, "fp32", lens, (1, 1, 1), block_size=16), tattn.attention,
                  max_query_len=1)  # fmt: skip
    case = batch(3, "bf16", lens, (1, 1, 1), block_size=16)
    run_and_check(case, tattn.attention)  # no hint
    run_and_check(case, tattn.attention, num_padding=2, max_query_len=1)
    run_and_check(case, tattn.decode_attention, max_query_len=1,
                  config=tdecode.DecodeConfig(block_n=16))  # a forced config  # fmt: skip
    assert calls == [] and persistent == []
    run_and_check(case, tattn.attention, max_query_len=1)
    assert calls == [1] and persistent == []
    monkeypatch.setattr(tdecode, "_sm_count", lambda device: 4)  # 6 programs > 4 SMs
    run_and_check(case, tattn.attention, max_query_len=1)
    assert calls == [1] and persistent == [3]
    monkeypatch.setattr(ws, "PERSISTENT_ENABLED", False)  # HAL_ATTN_WS_PERSISTENT=0
    run_and_check(case, tattn.attention, max_query_len=1)
    assert calls == [1] and persistent == [3]


@gpu_only
def test_captures_in_a_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    # Split (the hint sizes the grid for 4096 tokens) and whole, captured and replayed on new
    # queries: the same bits as an eager call.
    calls = _spy(monkeypatch)
    case = batch(21, "bf16", (300, 1000, 64, 7), (1,) * 4, block_size=16, head_dim=128)
    t = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.build().items()}
    args = (t["query"], t["key_cache"], t["value_cache"], t["block_tables"], t["seq_lens"],
            t["query_start_loc"], t["scale"])  # fmt: skip
    for hint in (4096, 1000):
        tattn.attention(*args, max_query_len=1, max_seq_len=hint)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = tattn.attention(*args, max_query_len=1, max_seq_len=hint)
        t["query"].copy_(torch.randn_like(t["query"]))
        graph.replay()
        torch.cuda.synchronize()
        eager = tattn.attention(*args, max_query_len=1, max_seq_len=hint)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert calls[0] > 1 and calls[-1] == 1
