"""The Gluon 4-bit kernel for decode sizes (`backends.triton.int4_gluon`) against the CPU
reference in float64, with the tolerance of test_int4_gemm (the conformance bound). Gluon kernels
do not run under the interpreter, so the numerics need an NVIDIA GPU (sm_80+); the config checks
and the dispatch reasons run everywhere."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from backends.triton import int4_gluon  # noqa: E402

GPU = torch.cuda.is_available() and torch.version.hip is None and int4_gluon.HAVE_GLUON
if GPU:
    GPU = int4_gluon.usable(torch.zeros(1, 8, dtype=torch.bfloat16, device="cuda")) is None
gpu_only = pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU (sm_80+) with Gluon")


def test_config_checks() -> None:
    wide, narrow = int4_gluon.GLUON_CONFIGS[0][2], int4_gluon.GLUON_CONFIGS[-1][2]
    assert int4_gluon.pick_config(1, 28672) == int4_gluon.pick_config(8, 14336) == wide
    assert int4_gluon.pick_config(1, 6144) == int4_gluon.pick_config(8) == narrow
    assert wide != narrow
    with pytest.raises(ValueError, match="M=9, N=4096: no Gluon launch shape .* M <= 8"):
        int4_gluon.pick_config(9, 4096)
    table = ((4, 0, narrow),)
    assert int4_gluon.pick_config(4, configs=table) == narrow
    with pytest.raises(ValueError, match="M=5"):
        int4_gluon.pick_config(5, configs=table)


def test_register_cap_fits_the_planned_programs() -> None:
    # 64K registers an SM, allocated 8 a thread: the cap lets programs_per_sm programs reside.
    cap = int4_gluon.Int4GluonConfig
    assert cap(64, 4, 8).maxnreg == 64 and cap(128, 4, 4).maxnreg == 128
    assert cap(16, 1, 32).maxnreg == 64 and cap(128, 4, 6).maxnreg == 80
    assert cap(64, 4, 1).maxnreg is None and cap(128, 4, 2).maxnreg is None  # 512 / 256 a thread
    for cfg in (cap(64, 4, 8), cap(128, 4, 6), cap(16, 1, 32)):
        assert cfg.programs_per_sm * cfg.num_warps * 32 * cfg.maxnreg <= 65536


def test_config_override() -> None:
    assert int4_gluon.config_override(None) is None and int4_gluon.config_override("") is None
    assert int4_gluon.config_override("64x2X8") == int4_gluon.Int4GluonConfig(64, 2, 8)
    with pytest.raises(ValueError, match="HAL_INT4_GLUON_CFG='64x2': expected NxWxP"):
        int4_gluon.config_override("64x2")
    with pytest.raises(ValueError, match="16 or 32 rows per warp"):
        int4_gluon.config_override("96x4x4")
    with pytest.raises(ValueError, match="16 or 32 rows per warp"):
        int4_gluon.Int4GluonConfig(block_n=96, num_warps=4)
    with pytest.raises(ValueError, match="num_warps: 3 must be a power of two"):
        int4_gluon.Int4GluonConfig(block_n=96, num_warps=3)
    with pytest.raises(ValueError, match="programs_per_sm: 0"):
        int4_gluon.Int4GluonConfig(programs_per_sm=0)


def test_usable_says_why_not() -> None:
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    assert int4_gluon.usable(x) is not None  # CPU tensor
    if GPU:
        cuda = torch.zeros(2, 72, dtype=torch.bfloat16, device="cuda")
        assert int4_gluon.usable(cuda) is None
        assert "not bfloat16 or float16" in int4_gluon.usable(cuda.float())
        assert "16-byte" in int4_gluon.usable(cuda[:, 1:65])  # rows start 2 bytes in


def test_device_reason_for_hal_info(monkeypatch) -> None:
    monkeypatch.setattr(int4_gluon, "interpreting", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert int4_gluon.device_reason(cc_ok=True) is None
    assert int4_gluon.device_reason(cc_ok=False) == "compute capability below 8.0"
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "not an NVIDIA GPU" in int4_gluon.device_reason(cc_ok=True)
    monkeypatch.setattr(int4_gluon, "HAVE_GLUON", False)
    assert int4_gluon.device_reason(cc_ok=True) == "this Triton has no Gluon"
    monkeypatch.setattr(int4_gluon, "ENABLED", False)
    assert int4_gluon.device_reason(cc_ok=True) == "HAL_INT4_GLUON=0"


if GPU:
    from tests.backends.triton import test_int4_gemm as T

    ig = T.ig


def spy_gluon(monkeypatch) -> list:
    """The configs `launch_gluon` runs with from now on (the kernel still runs)."""
    calls = []
    real = int4_gluon.launch_gluon

    def spy(*args):
        calls.append(args[7])
        return real(*args)

    monkeypatch.setattr(int4_gluon, "launch_gluon", spy)
    return calls


# (M, N, K, group size, dtype, g_idx kind, bias, tile rows, config, SMs seen by the launcher):
# N below, at and past the 128-row block; row-major and tiled words; one chunk and several per
# split; split-K through the reduce kernel and the final store (one SM: one split); groups of
# two chunks; desc_act (x permuted first); 16-row warps (block_n 64) and 32-row warps.
RUNS = [
    (1, 40, 256, 128, "bf16", None, True, 0, None, None),
    (8, 300, 512, 128, "fp16", "desc_act", False, 0, None, None),
    (3, 256, 1024, 256, "bf16", None, True, 128, None, None),
    (5, 512, 384, 128, "fp16", None, True, 128, (128, 4, 1), None),
    (2, 384, 640, 128, "bf16", None, True, 128, (128, 4, 1), 1),
    (7, 200, 768, 128, "bf16", "desc_act", False, 0, (64, 4, 2), 1),
    (4, 1024, 512, 128, "fp16", None, False, 128, (256, 8, 2), None),
    (6, 640, 512, 128, "bf16", None, False, 128, (64, 4, 8), None),  # half tiles, the gate_up shape
]


@gpu_only
@pytest.mark.parametrize("run", range(len(RUNS)))
def test_matches_reference(monkeypatch, run: int) -> None:
    m, n, k, gs, dtype, g_kind, bias, tile_rows, cfg, sms = RUNS[run]
    case = T.make_case(m, n, k, gs, T.FLOATS[dtype], g_kind == "desc_act", bias, seed=run)
    q = [T.dev(case[key]) for key in ("qweight", "scales", "zeros")]
    p = ig.repack_int4_for_triton(*q, gs, T.dev(case["g_idx"]), order="pairs",
                                  tile_rows=tile_rows)  # fmt: skip
    assert p.qweight.dim() == (4 if tile_rows else 2)
    if cfg is not None:
        config = int4_gluon.Int4GluonConfig(*cfg)
        monkeypatch.setattr(int4_gluon, "pick_config", lambda m_, n_=0, configs=None: config)
    if sms is not None:
        monkeypatch.setattr(ig, "_sm_count", lambda device: sms)
    calls = spy_gluon(monkeypatch)
    T.check(case, T.run_packed(case, p))
    assert len(calls) == 1


@gpu_only
def test_other_sizes_and_inputs_take_the_pairs_kernel(monkeypatch) -> None:
    calls = spy_gluon(monkeypatch)
    case = T.make_case(9, 64, 256, 128, torch.bfloat16, False, True, seed=3)
    q = [T.dev(case[key]) for key in ("qweight", "scales", "zeros")]
    p = ig.repack_int4_for_triton(*q, 128, order="pairs")
    T.check(case, T.run_packed(case, p))  # M = 9: the wgmma pairs kernel
    small = dict(case, x=case["x"][:4])
    T.check(small, T.run_packed(small, p, config=ig.int4_tc.Int4PairsConfig(16, 16)))  # forced
    wide = torch.zeros(4, 257, dtype=torch.bfloat16)
    wide[:, 1:] = small["x"]
    T.check(small, ig.int4_linear(T.dev(wide)[:, 1:], p, bias=T.dev(case["bias"])))  # unaligned
    monkeypatch.setattr(int4_gluon, "ENABLED", False)
    T.check(small, T.run_packed(small, p))  # HAL_INT4_GLUON=0
    assert calls == []
    monkeypatch.setattr(int4_gluon, "ENABLED", True)
    T.check(small, T.run_packed(small, p))
    assert len(calls) == 1


@gpu_only
def test_same_bits_as_often_as_run() -> None:
    # Fixed split order: the same inputs give the same bits (graph replays rely on it).
    case = T.make_case(3, 256, 1024, 128, torch.bfloat16, False, True, seed=5)
    q = [T.dev(case[key]) for key in ("qweight", "scales", "zeros")]
    p = ig.repack_int4_for_triton(*q, 128, order="pairs", tile_rows=128)
    first = T.run_packed(case, p)
    assert all(torch.equal(first, T.run_packed(case, p)) for _ in range(3))


OFFLINE = r"""
import json
import subprocess
import tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from backends.triton import int4_gluon as g

# The gate_up call at M = 1 as the JIT specializes it (16-divisible sizes and pointers, unit
# strides and one row as constants), with the wide shape's register cap and without.
fn = g._int4_gluon_kernel
cfg = g.GLUON_CONFIGS[0][2]
types = {"x_ptr": "*bf16", "qweight_ptr": "*i32", "scales_ptr": "*bf16", "zeros_ptr": "*u8",
         "bias_ptr": "*bf16", "out_ptr": "*fp32"}
div16 = [*types, "stride_x_row", "stride_qw_row", "stride_qw_tile", "stride_qw_chunk",
         "stride_s_group", "stride_z_group", "stride_out_split", "stride_out_row", "n_cols",
         "n_chunks", "chunks_per_split"]
consts = dict(GROUP_CHUNKS=1, HAS_BIAS=False, FINAL=False, DOT_DTYPE=gl.bfloat16,
              MAGIC2=0x43004300, MAGIC=128, BLOCK_M=g.BLOCK_M, BLOCK_N=cfg.block_n,
              ONES_N=16 * cfg.num_warps, PDL=True, EARLY=True, stride_s_row=1, stride_z_row=1,
              n_rows=1, **g._layouts(cfg.block_n, cfg.num_warps))
sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
out = {}
for cap in (None, cfg.maxnreg):
    src = gluon._runtime.GluonASTSource(
        fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16})
    options = dict(num_warps=cfg.num_warps, **({"maxnreg": cap} if cap else {}))
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        info = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"],
                              capture_output=True, text=True).stderr
    used = int(info.split("Used ")[1].split()[0])
    spills = "0 bytes spill stores" not in info
    out[str(cap)] = {"regs": used, "spills": spills, "vector_loads": "ld.global.v4" in ptx}
print(json.dumps({"cap": cfg.maxnreg, "programs": cfg.programs_per_sm, "warps": cfg.num_warps,
                  "builds": out}))
"""


@pytest.mark.skipif(not int4_gluon.HAVE_GLUON, reason="this Triton has no Gluon")
def test_register_cap_offline_sm90() -> None:
    # The wide launch shape built for sm_90 without a GPU: 16-byte word loads, and within its
    # register cap no spills, where the uncapped build takes more than the planned programs
    # per SM can have (so fewer would reside than the split count assumes).
    from tests.backends.triton.test_pipeline_stages import run_offline

    found = run_offline(OFFLINE)
    capped, free = found["builds"][str(found["cap"])], found["builds"]["None"]
    assert capped["vector_loads"] and free["vector_loads"]
    assert capped["regs"] <= found["cap"] and not capped["spills"], found
    assert free["regs"] > found["cap"], found  # else the cap changes nothing: drop it
