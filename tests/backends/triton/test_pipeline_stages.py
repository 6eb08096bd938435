"""The sm_90 attention table entries keep a K/V tile in flight during the math.

The K/V addresses come from a block-table load, and Triton's pipeliner splits num_stages between
the two: below 5 stages the loop waits for every copy at the top of each iteration (TTGIR
`async_wait {num = 0}`) and no load overlaps the math (docs/attention.md, "Pipeline stages and the
block table"). This compiles the kernels for sm_90 offline (Triton's bundled ptxas; no GPU) in a
fresh interpreter-free process and reads the waits of their main loops; and the decode kernel's
two load paths for a native FP8 cache (HAL_ATTN_FP8_PAIRS), compiled the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import json, re, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from backends.triton import attention as A
from backends.triton import attention_decode as D

BF16 = {"query_ptr", "key_cache_ptr", "value_cache_ptr", "out_ptr"}
TYPES = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "block_tables_ptr": "*i32",
         "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32", "s_scale": "fp32",
         "cap_log2": "fp32", "out_scale": "fp32"}
COMMON = dict(IS_FP8=0, MAN_BITS=3, EXP_BIAS=7, FP8_MAX=448.0, NAN_CODE=127, FNUZ=False,
              HAS_INF=False, SOFT_CAP=False, DOT_DTYPE=tl.bfloat16, Q_SCALED=False,
              INPUT_PRECISION="ieee", INTERPRET=False, EVEN_D=True, SPLIT=False, PAGE_SIZE=16,
              HEAD_DIM_P2=128, EARLY_META=False, EARLY_TRIGGER=False, FP8_PAIRS=True, PDL=False)


def waits(fn, consts, num_warps, num_stages):
    consts = {k: v for k, v in {**COMMON, **consts}.items() if k in fn.arg_names}
    sig = {n: "constexpr" if n in consts else ("*bf16" if n in BF16 else TYPES.get(n, "i32"))
           for n in fn.arg_names}
    # pointers and the cache strides 16-byte aligned, as the launches specialise them
    aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n.startswith("stride_kc")
               or n == "stride_bt_row"]
    src = triton.compiler.ASTSource(
        fn=fn, signature=sig,
        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    return [int(v) for v in re.findall(r"async_wait.*?num = (\d+)", k.asm["ttgir"])]


out = {}
for name, cfg in (("decode", D.DECODE_CONFIGS[("narrow", "big_smem")]),
                  ("decode_one_wave", D.DECODE_ONE_WAVE[("narrow", "big_smem")]),
                  ("decode_3_stages", D.DecodeConfig(block_n=64, num_warps=4, num_stages=3))):
    out[name] = waits(D._decode_kernel, dict(BLOCK_M=16, BLOCK_N=cfg.block_n), cfg.num_warps,
                      cfg.num_stages)
p = A.PREFILL_CONFIGS[("narrow", "big_smem")]
out["prefill"] = waits(A._attention_kernel, dict(BLOCK_M=p.block_m, BLOCK_N=p.block_n),
                       p.num_warps, p.num_stages)
print(json.dumps(out))
"""


def run_offline(script: str, **env_vars: str):
    """Run an offline-compile script in a fresh interpreter-free process (env_vars added to its
    environment, e.g. switches read at import); its last stdout line, as JSON."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", **env_vars}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    if run.returncode != 0:
        if "ptxas" in run.stderr and ("not found" in run.stderr or "No such file" in run.stderr):
            pytest.skip("Triton's NVIDIA toolchain (ptxas) is not installed")
        raise AssertionError(f"offline sm_90 compile failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def loop_waits() -> dict[str, list[int]]:
    return run_offline(SCRIPT)


@pytest.mark.parametrize("kernel", ["decode", "decode_one_wave", "prefill"])
def test_sm90_table_entries_overlap_loads_with_math(loop_waits, kernel: str) -> None:
    # Some wait in the loop leaves copies outstanding (the next tile's K and V).
    assert max(loop_waits[kernel], default=0) > 0, loop_waits[kernel]


def test_three_stages_wait_for_everything(loop_waits) -> None:
    # The control: the block-table indirection leaves 3 stages no overlap at all.
    assert loop_waits["decode_3_stages"] and max(loop_waits["decode_3_stages"]) == 0


# DecodeConfig.fp8_pairs (and HAL_ATTN_FP8_PAIRS=0 for every launch) switches how the decode kernel
# loads a native FP8 (e4m3fn) KV cache on sm_89+: as int16 pairs widened, joined and stored back to
# shared memory for the dot (default), or as bytes widened in the dot operands' registers. Only a
# GPU runs either (the interpreter decodes FP8 from the bits), so the wide-batch FP8 tile is
# compiled here in both modes.
FP8_SCRIPT = r"""
import json
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from backends.triton import attention_common as C
from backends.triton import attention_decode as D

cfg = D.DECODE_WIDE_BATCH[("narrow", "big_smem", True)][0][1]
fn = D._decode_kernel
types = {"query_ptr": "*bf16", "out_ptr": "*bf16", "key_cache_ptr": "*u8",
         "value_cache_ptr": "*u8", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
         "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
         "s_scale": "fp32", "cap_log2": "fp32", "out_scale": "fp32"}
aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n.startswith("stride_kc")
           or n == "stride_bt_row"]
out = {}
for name, pairs in (("pairs", True), ("bytes", False)):
    consts = dict(IS_FP8=C.FP8_NATIVE_E4M3, MAN_BITS=3, EXP_BIAS=7, FP8_MAX=448.0, NAN_CODE=127,
                  FNUZ=False, HAS_INF=False, SOFT_CAP=False, DOT_DTYPE=tl.float16, Q_SCALED=True,
                  INPUT_PRECISION="ieee", INTERPRET=False, EVEN_D=True, SPLIT=False,
                  PAGE_SIZE=16, HEAD_DIM_P2=128, EARLY_META=True, EARLY_TRIGGER=False,
                  FP8_PAIRS=pairs, PDL=True, BLOCK_M=16, BLOCK_N=cfg.block_n)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    src = triton.compiler.ASTSource(
        fn=fn, signature=sig,
        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = k.asm["ptx"]
    out[name] = dict(shared=k.metadata.shared, st_shared=ptx.count("st.shared"),
                     cvt=ptx.count("cvt.rn.f16x2.e4m3x2"))
print(json.dumps(out))
"""


def test_fp8_byte_loads_skip_the_shared_memory_round_trip() -> None:
    got = run_offline(FP8_SCRIPT)
    pairs, byte = got["pairs"], got["bytes"]  # DecodeConfig.fp8_pairs True / False
    # Both widen with the hardware's paired conversion (two codes per instruction).
    assert pairs["cvt"] > 0 and byte["cvt"] > 0, got
    # The byte path keeps the widened tiles out of shared memory: fewer stores, a smaller buffer.
    assert byte["st_shared"] < pairs["st_shared"], got
    assert byte["shared"] < pairs["shared"], got
    # HAL_ATTN_FP8_PAIRS=0 makes every launch load bytes, whatever its config says.
    forced = run_offline(FP8_SCRIPT, HAL_ATTN_FP8_PAIRS="0")
    assert forced["pairs"] == byte and forced["bytes"] == byte, forced
