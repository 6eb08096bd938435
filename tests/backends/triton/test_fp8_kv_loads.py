"""HAL_ATTN_FP8_PAIRS switches how the decode kernel loads a native FP8 (e4m3fn) KV cache on
sm_89+: as int16 pairs widened, joined and stored back to shared memory for the dot (default), or
as bytes widened in the dot operands' registers (=0). Only a GPU runs either (the interpreter
decodes FP8 from the bits), so this compiles the wide-batch FP8 tile for sm_90 offline in both
modes (Triton's bundled ptxas, no GPU) and checks that the switch changes the code as documented:
the byte path needs less shared memory and no shared-memory round trip for the converted tiles.
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
import json
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from backends.triton import attention_common as C
from backends.triton import attention_decode as D

cfg = D.DECODE_WIDE_BATCH[("narrow", "big_smem", True)][0][1]
consts = dict(IS_FP8=C.FP8_NATIVE_E4M3, MAN_BITS=3, EXP_BIAS=7, FP8_MAX=448.0, NAN_CODE=127,
              FNUZ=False, HAS_INF=False, SOFT_CAP=False, DOT_DTYPE=tl.float16, Q_SCALED=True,
              INPUT_PRECISION="ieee", INTERPRET=False, EVEN_D=True, SPLIT=False, PAGE_SIZE=16,
              HEAD_DIM_P2=128, EARLY_META=True, EARLY_TRIGGER=False, PDL=True, BLOCK_M=16,
              BLOCK_N=cfg.block_n)
fn = D._decode_kernel
consts = {k: v for k, v in consts.items() if k in fn.arg_names}
types = {"query_ptr": "*bf16", "out_ptr": "*bf16", "key_cache_ptr": "*u8",
         "value_cache_ptr": "*u8", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
         "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
         "s_scale": "fp32", "cap_log2": "fp32", "out_scale": "fp32"}
sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n.startswith("stride_kc")
           or n == "stride_bt_row"]
src = triton.compiler.ASTSource(
    fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
ptx = k.asm["ptx"]
print(json.dumps(dict(shared=k.metadata.shared, st_shared=ptx.count("st.shared"),
                      cvt=ptx.count("cvt.rn.f16x2.e4m3x2"))))
"""


def _compile(pairs: str) -> dict:
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0", "HAL_ATTN_FP8_PAIRS": pairs}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    if run.returncode != 0:
        if "ptxas" in run.stderr and ("not found" in run.stderr or "No such file" in run.stderr):
            pytest.skip("Triton's NVIDIA toolchain (ptxas) is not installed")
        raise AssertionError(f"offline sm_90 compile failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_fp8_byte_loads_skip_the_shared_memory_round_trip() -> None:
    pairs, byte = _compile("1"), _compile("0")
    # Both widen with the hardware's paired conversion (two codes per instruction).
    assert pairs["cvt"] > 0 and byte["cvt"] > 0, (pairs, byte)
    # The byte path keeps the widened tiles out of shared memory: fewer stores, a smaller buffer.
    assert byte["st_shared"] < pairs["st_shared"], (pairs, byte)
    assert byte["shared"] < pairs["shared"], (pairs, byte)
