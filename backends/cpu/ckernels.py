"""The CPU engine's C kernels, built from `backends/cpu/csrc` with the machine's C compiler at
first use and loaded through ctypes (no torch headers: a build takes about a second).

`codes_gemm` is the small-M GEMM on GGUF weights kept as int8 codes with per-group fp32 scales
and offsets (the "tiled" layout of `backends/cpu/gguf_fast.py`): it reads 1 byte per weight where
the fp32 paths read 4, and is what the CPU backend runs for decode-sized batches of GGUF models
(M <= its MAX_M). fp32 arithmetic throughout; the summation order differs from x @ w.T (no fp32
weight is formed: per group, scale * sum(codes * x) + offset * sum(x)). `rotary_kv_f32`
(`rotary_kv.c`) is the CPU backend's "c" rotary: NeoX rotation of fp32 query and key rows, and
optionally the rotated key and value written into fp32 paged caches, in one pass with the
reference's roundings (the same bits; torch takes ~20 small ops for it at decode sizes).
`decode_attention_f32` (`decode_attention.c`) is the CPU backend's "c" attention for decode
batches (one query token per sequence) on fp32 caches: straight from the pages, no gather, fp32
within roundoff of the reference. `rms_norm_f32` (`rms_norm.c`) is the "c" rms_norm: the residual
add and RMSNorm of fp32 rows in one call, summing the squares in the order of torch's vectorized
sum (the lane width found by its self-check), so the same bits as torch. `decoder_layer_f32`
(`decoder_layer.c`) runs one decoder layer of a GGUF decode step by calling the others through
their loaded libraries' function pointers (`backends/cpu/decoder.py`).

Build: `$CC` (else `cc`) with `-O3 -ffp-contract=off -march=native -fopenmp -shared -fPIC`,
then without `-march=native`, then without OpenMP, the first that works. The library is cached under
`$HAL_CACHE_DIR` (else `$XDG_CACHE_HOME/hal-engine`, else `~/.cache/hal-engine`), keyed by the
source, the flags, the compiler's version and this CPU's feature flags (a `-march=native` build
never loads on another CPU), and written by rename so concurrent processes never see half a
file. A machine without a compiler, or a build or self-check that fails, gets None and the
reason, and keeps the torch paths. `HAL_CPU_C_KERNELS=0` never builds or loads them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hal.env import env_flag

logger = logging.getLogger(__name__)

ENV = "HAL_CPU_C_KERNELS"
CACHE_ENV = "HAL_CACHE_DIR"
SOURCE = Path(__file__).resolve().with_name("csrc") / "codes_gemm.c"
ROTARY_SOURCE = SOURCE.with_name("rotary_kv.c")
ATTENTION_SOURCE = SOURCE.with_name("decode_attention.c")
RMS_NORM_SOURCE = SOURCE.with_name("rms_norm.c")
DECODER_SOURCE = SOURCE.with_name("decoder_layer.c")
# -ffp-contract=off: no multiply-add the source does not write, so every row of x gets the same
# sums whatever M and the thread split are (a sequence's logits do not depend on its batch).
FLAG_SETS = (
    ("-O3", "-ffp-contract=off", "-march=native", "-fopenmp"),
    ("-O3", "-ffp-contract=off", "-fopenmp"),
    ("-O3", "-ffp-contract=off"),
)
BUILD_TIMEOUT_S = 120


def enabled() -> bool:
    """HAL_CPU_C_KERNELS: unset or 1/true/on/yes builds and uses them, 0/false/off/no never."""
    return env_flag(ENV) is not False


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "ckernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hal-engine" / "ckernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler() -> tuple[str | None, str]:
    """(compiler path, its first version line), or (None, why not)."""
    name = os.environ.get("CC") or "cc"
    path = shutil.which(name)
    if path is None:
        return None, f"no C compiler: {name!r} is not on PATH (set CC to one)"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"C compiler {path} does not run: {e}"
    return path, (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""


def _build(cc: str, version: str, source: Path) -> tuple[Path | None, str]:
    """The built library (cached), or (None, the last compiler error)."""
    text = source.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([text, " ".join(flags).encode(), version.encode(), _cpu_flags().encode()])
        ).hexdigest()[:16]
        target_dir = cache_dir() / key
        target = target_dir / f"{source.stem}.so"
        if target.is_file():
            return target, ""
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            target_dir = Path(tempfile.mkdtemp(prefix="hal-ckernels-"))
            target = target_dir / f"{source.stem}.so"
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target_dir)
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", "-o", tmp, str(source)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            run = None
            errors.append(f"{' '.join(flags)}: {e}")
        if run is not None and run.returncode == 0:
            os.replace(tmp, target)
            logger.info("built %s with %s %s", target, cc, " ".join(flags))
            return target, ""
        if run is not None:
            tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["(no output)"]
            errors.append(f"{' '.join(flags)}: exit {run.returncode}: {tail[0][:200]}")
        Path(tmp).unlink(missing_ok=True)
    return None, f"building {source.name} failed with {cc}: " + "; ".join(errors)


@dataclass(frozen=True)
class CodesKernel:
    """The loaded `codes_gemm` library."""

    lib: ctypes.CDLL
    path: Path
    max_m: int  # the most rows of x one call takes
    vector_width: int  # fp32 lanes of its inner loop (16 AVX-512, 8 AVX2, 0 plain C)
    openmp: bool

    def describe(self) -> str:
        isa = {16: "AVX-512", 8: "AVX2"}.get(self.vector_width, "plain C")
        threads = "OpenMP" if self.openmp else "one thread"
        return f"C codes kernel ({isa}, {threads}) for M <= {self.max_m}"

    def takes(self, m: int, k: int, group: int) -> bool:
        """Whether one call takes M = m rows of x against groups of `group` values along K."""
        whole = group >= 1 and k % group == 0
        return 1 <= m <= self.max_m and whole and group % max(self.vector_width, 1) == 0

    def bind(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor | None,
        bias: int | None = None,
    ) -> CodesWeight:
        """The weight codes * scale fp32 [N, K / G(, 1)] + offset (same shape, or None), all
        contiguous CPU tensors, checked once for every later call (`CodesWeight`). codes: int8
        [N, K] (bias None), or 4-bit codes two per byte, uint8 [N, K / 2] (`pack_codes4`'s
        order), each plus `bias` (Q4_0's -8; 0 for Q4_1 / Q4_K), with G a multiple of 32."""
        nibbles = bias is not None
        n, k = codes.shape[0], codes.shape[1] * (2 if nibbles else 1)
        groups = scale.shape[1] if scale.dim() >= 2 else 0
        group = k // groups if groups else 0
        want = torch.uint8 if nibbles else torch.int8
        if codes.dtype != want or scale.dtype != torch.float32:
            kind = "uint8 (4-bit codes two per byte)" if nibbles else "int8"
            raise ValueError(
                f"codes_gemm: codes {codes.dtype}, scale {scale.dtype}: expected {kind}, float32"
            )
        if codes.dim() != 2 or scale.shape[0] != n or not groups or group * groups != k:
            raise ValueError(
                f"codes_gemm: codes {tuple(codes.shape)} and scale {tuple(scale.shape)} do not "
                f"describe a [{n}, {k}] weight in whole groups"
            )
        if offset is not None and (offset.dtype != torch.float32 or offset.shape != scale.shape):
            raise ValueError(
                f"codes_gemm: offset {offset.dtype} {tuple(offset.shape)}: expected float32 "
                f"{tuple(scale.shape)} (scale's shape)"
            )
        if not self.takes(1, k, group) or (nibbles and group % 32):
            raise ValueError(
                f"codes_gemm: groups of {group} values: takes groups dividing K = {k} in "
                f"multiples of {32 if nibbles else max(self.vector_width, 1)}"
            )
        if nibbles and not -8 <= bias <= 0:
            raise ValueError(f"codes_gemm: bias {bias}: 4-bit codes take a bias in -8..0")
        tensors = (codes, scale) + ((offset,) if offset is not None else ())
        if not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors):
            raise ValueError("codes_gemm: every tensor must be a contiguous CPU tensor")
        return CodesWeight(self, codes, scale, offset, n, k, group, bias)

    def __call__(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor | None,
        threads: int | None = None,
        bias: int | None = None,
    ) -> torch.Tensor:
        """y fp32 [M, N] = x fp32 [M, K] times the weight codes [N, K] * scale fp32
        [N, K / G(, 1)] + offset (same shape, or None), all contiguous CPU tensors (codes and
        bias as `bind` takes them)."""
        return self.bind(codes, scale, offset, bias)(x, threads)

    def dequantize4(
        self,
        codes4: torch.Tensor,
        bias: int,
        scale: torch.Tensor,
        offset: torch.Tensor | None,
    ) -> torch.Tensor:
        """fp32 [rows, K] = (4-bit code + bias) * scale + offset, rounded as torch's
        `codes.float() * scale + offset` rounds it (the tiled path's dequantize, same bits)."""
        weight = self.bind(codes4, scale, offset, bias)
        out = torch.empty(weight.n, weight.k, dtype=torch.float32)
        rc = self.lib.codes4_dequant(
            codes4.data_ptr(), bias, scale.data_ptr(),
            offset.data_ptr() if offset is not None else None, weight.n, weight.k, weight.group,
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"codes4_dequant rejected [{weight.n}, {weight.k}] (code {rc})")
        return out


@dataclass(frozen=True, eq=False)
class CodesWeight:
    """A weight `CodesKernel.bind` checked: a call checks only x (a decode step makes ~4 per
    layer, so the weight's checks are not repeated each time)."""

    kernel: CodesKernel
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    n: int
    k: int
    group: int
    bias: int | None = None  # None: int8 codes; else 4-bit codes two per byte, plus bias

    def __call__(self, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """y fp32 [M, N] = x fp32 [M, K] (contiguous, CPU, 1 <= M <= the kernel's max_m) @ W.T."""
        m, k = x.shape
        if x.dtype != torch.float32 or k != self.k or not 1 <= m <= self.kernel.max_m:
            raise ValueError(
                f"codes_gemm: x {x.dtype} {tuple(x.shape)}: expected float32 [M, {self.k}] with "
                f"1 <= M <= {self.kernel.max_m}"
            )
        if not x.is_contiguous() or x.device.type != "cpu":
            raise ValueError("codes_gemm: x must be a contiguous CPU tensor")
        y = torch.empty(m, self.n, dtype=torch.float32)
        offset = self.offset
        lib, head = self.kernel.lib, (self.codes.data_ptr(),)
        fn = lib.codes_gemm if self.bias is None else lib.codes4_gemm
        if self.bias is not None:
            head += (self.bias,)
        rc = fn(
            *head, self.scale.data_ptr(), offset.data_ptr() if offset is not None else None,
            self.n, k, self.group, x.data_ptr(), k, m, y.data_ptr(), self.n, None,
            max(1, threads or torch.get_num_threads()),
        )  # fmt: skip
        if rc != 0:
            why = "no memory for its scratch" if rc == -2 else "arguments it cannot take"
            raise RuntimeError(
                f"codes_gemm: M={m}, N={self.n}, K={k}, group {self.group}: {why} (code {rc})"
            )
        return y


def pack_codes4(codes: torch.Tensor, bias: int) -> torch.Tensor:
    """int8 codes [N, K] (K a multiple of 32) whose values minus bias lie in 0..15 as the 4-bit
    kernels read them: uint8 [N, K / 2], in each run of 32 values byte j holding value j in its
    low nibble and value j + 16 in its high one. Lossless (`unpack_codes4` inverts it)."""
    n, k = codes.shape
    if k % 32:
        raise ValueError(f"codes: K = {k} is not a multiple of 32")
    v = codes.to(torch.int16) - bias
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > 15):
        raise ValueError(f"codes: values minus bias {bias} must lie in 0..15 to pack in 4 bits")
    v = v.to(torch.uint8).view(n, k // 32, 2, 16)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_codes4(codes4: torch.Tensor, bias: int) -> torch.Tensor:
    """The int8 codes [N, K] that `pack_codes4(codes, bias)` packed."""
    n, half = codes4.shape
    b = codes4.view(n, half // 16, 1, 16)
    v = torch.cat([b & 0x0F, b >> 4], dim=2).reshape(n, 2 * half)
    return (v.to(torch.int16) + bias).to(torch.int8)


def _self_check(kernel: CodesKernel) -> str:
    """'' when the kernel gives x @ w.T within fp32 accuracy on random data, and its 4-bit
    entries the int8 entry's bits on the same values, else why not."""
    g = torch.Generator().manual_seed(0)
    n, k, group = 37, 128, 32
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, 1, generator=g)
    offset = torch.randn(n, k // group, 1, generator=g)
    w = (codes.double().view(n, -1, group) * scale.double() + offset.double()).view(n, k)
    for m in (1, kernel.max_m):
        x = torch.randn(m, k, generator=g)
        y = kernel(x, codes, scale, offset, threads=2).double()
        ref = x.double() @ w.t()
        err = float((y - ref).abs().max() / ref.abs().max())
        if not err < 1e-5:
            return f"self-check failed: M = {m}, relative error {err:.1e} against fp64"
    small = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    packed = pack_codes4(small, -8)
    for m in (1, kernel.max_m):
        x = torch.randn(m, k, generator=g)
        if not torch.equal(
            kernel(x, packed, scale, offset, threads=2, bias=-8),
            kernel(x, small, scale, offset, threads=2),
        ):
            return f"self-check failed: M = {m}, the 4-bit codes' product differs from int8's"
    w4 = kernel.dequantize4(packed, -8, scale, offset)
    want = (small.float().view(n, -1, group) * scale + offset).view(n, k)
    if not torch.equal(w4, want):
        return "self-check failed: the 4-bit dequantize differs from torch's"
    return ""


def load_codes_kernel() -> tuple[CodesKernel | None, str]:
    """(the kernel, '') or (None, the reason it is not used here): HAL_CPU_C_KERNELS read at
    each call, the library built, loaded and checked once per process."""
    if not enabled():
        return None, f"{ENV}=0"
    return _load()


@functools.cache
def _library(source: Path) -> tuple[ctypes.CDLL | None, str]:
    """The built and loaded library of one source in csrc, or (None, why); once per process."""
    cc, version = _compiler()
    if cc is None:
        return None, version
    path, why = _build(cc, version, source)
    if path is None:
        return None, why
    try:
        return ctypes.CDLL(str(path)), ""
    except OSError as e:
        return None, f"loading {path} failed: {e}"


@functools.cache
def _load() -> tuple[CodesKernel | None, str]:
    lib, why = _library(SOURCE)
    if lib is None:
        return None, why
    path = Path(lib._name)
    _declare_codes(lib)
    kernel = CodesKernel(
        lib, path, lib.codes_gemm_max_m(), lib.codes_gemm_vector_width(),
        bool(lib.codes_gemm_openmp()),
    )  # fmt: skip
    why = _self_check(kernel)
    if why:
        return None, why
    return kernel, ""


def _declare_codes(lib: ctypes.CDLL) -> None:
    """The argument types of the codes library's entry points (ctypes converts by them)."""
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.codes_gemm.restype = ctypes.c_int
    lib.codes_gemm.argtypes = [p, p, p, i64, i64, i64, p, i64, i64, p, i64, p, ctypes.c_int]
    lib.codes4_gemm.restype = ctypes.c_int
    lib.codes4_gemm.argtypes = [
        p, ctypes.c_int, p, p, i64, i64, i64, p, i64, i64, p, i64, p, ctypes.c_int,
    ]  # fmt: skip
    lib.codes4_dequant.restype = ctypes.c_int
    lib.codes4_dequant.argtypes = [p, ctypes.c_int, p, p, i64, i64, i64, p, ctypes.c_int]


def rotary_input_error(rc: int, max_position: int, num_slots: int) -> ValueError:
    """What `rotary_kv_f32`'s code -1 (a position) or -2 (a slot) says about the caller's input."""
    if rc == -1:
        return ValueError(
            f"positions: values must lie in 0..{max_position - 1} (the cache's max_position)"
        )
    return ValueError(f"slot_mapping: slots must be -1 (skip) or lie in 0..{num_slots - 1}")


def attention_input_error(
    rc: int, max_blocks: int, block_size: int, num_blocks: int, seq_lens: torch.Tensor
) -> ValueError:
    """What `decode_attention_f32`'s code -2 (a length) or -3 (a block id) says about the
    caller's input."""
    if rc == -2:
        return ValueError(
            f"seq_lens: each must lie in 1..{max_blocks * block_size} (its block table row of "
            f"{max_blocks} blocks of {block_size}); got {seq_lens.tolist()}"
        )
    return ValueError(
        f"block_tables: a block id a sequence uses lies outside 0..{num_blocks - 1} (the cache's "
        "blocks)"
    )


@dataclass(frozen=True)
class RotaryKernel:
    """The loaded `rotary_kv_f32` library (see `rotary_kv.c`)."""

    lib: ctypes.CDLL

    def run(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        value: torch.Tensor | None = None,
        key_cache: torch.Tensor | None = None,
        value_cache: torch.Tensor | None = None,
        slot_mapping: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """NeoX rotary of query [T, Hq, D] and key [T, Hk, D] (fp32 CPU, heads D apart, any token
        stride) at int64 `positions` [T] from fp32 `cos_sin_cache` [max_position, rot]
        (contiguous); returns new contiguous (query, key). With value (like key), fp32 caches
        [num_blocks, block_size, Hk, D] (contiguous) and int64 slot_mapping [T] (-1 skips): the
        rotated key and the value are written there too. The caller checked the shapes and dtypes
        (`native.c_rotary`, `native.c_rotary_write_kv`); positions and slots are checked here,
        before anything is written."""
        t, hq, d = query.shape
        hk = key.shape[1]
        q_out = torch.empty(t, hq, d, dtype=torch.float32)
        k_out = torch.empty(t, hk, d, dtype=torch.float32)
        write = slot_mapping is not None
        num_slots = key_cache.shape[0] * key_cache.shape[1] if write else 0
        rc = self.lib.rotary_kv_f32(
            positions.data_ptr(), t, query.data_ptr(), query.stride(0), hq, key.data_ptr(),
            key.stride(0), hk, d, cos_sin_cache.shape[1], cos_sin_cache.data_ptr(),
            cos_sin_cache.shape[0], q_out.data_ptr(), k_out.data_ptr(),
            value.data_ptr() if write else None, value.stride(0) if write else 0,
            key_cache.data_ptr() if write else None, value_cache.data_ptr() if write else None,
            slot_mapping.data_ptr() if write else None, num_slots,
        )  # fmt: skip
        if rc in (-1, -2):
            raise rotary_input_error(rc, cos_sin_cache.shape[0], num_slots)
        if rc != 0:
            raise RuntimeError(
                f"rotary_kv_f32 rejected query {tuple(query.shape)}, rotary_dim "
                f"{cos_sin_cache.shape[1]} (code {rc})"
            )
        return q_out, k_out


def _rotary_self_check(kernel: RotaryKernel) -> str:
    """'' when the kernel gives the reference's bits on random data (partial rotary_dim, a
    strided query, the cache writes), else why not."""
    from backends.cpu.rotary import rotary

    g = torch.Generator().manual_seed(0)
    cs = torch.randn(7, 6, generator=g)
    pos = torch.tensor([3, 0, 6])
    q = torch.randn(3, 4, 10, generator=g)[:, 1:]  # token stride 40, heads 10 apart
    k, v = torch.randn(3, 2, 10, generator=g), torch.randn(3, 2, 10, generator=g)
    kc, vc = torch.zeros(2, 2, 2, 10), torch.zeros(2, 2, 2, 10)
    slots = torch.tensor([2, -1, 0])
    qo, ko = kernel.run(pos, q, k, cs, v, kc, vc, slots)
    want_q, want_k = rotary(pos, q, k, cs, True)
    flat_k, flat_v = kc.view(4, 2, 10), vc.view(4, 2, 10)
    if not (torch.equal(qo, want_q) and torch.equal(ko, want_k)):
        return "self-check failed: the rotation differs from the reference's bits"
    if not (torch.equal(flat_k[[2, 0]], want_k[[0, 2]]) and torch.equal(flat_v[[2, 0]], v[[0, 2]])):
        return "self-check failed: the cache writes differ from the rotated key and value"
    if flat_k[[1, 3]].any() or flat_v[[1, 3]].any():
        return "self-check failed: a skipped slot was written"
    return ""


def load_rotary_kernel() -> tuple[RotaryKernel | None, str]:
    """(the rotary kernel, '') or (None, why not here); HAL_CPU_C_KERNELS read at each call."""
    if not enabled():
        return None, f"{ENV}=0"
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    args = (p, i64, p, i64, i64, p, i64, i64, i64, i64, p, i64, p, p, p, i64, p, p, p, i64)
    return _checked(ROTARY_SOURCE, "rotary_kv_f32", args, RotaryKernel, _rotary_self_check)


@functools.cache
def _checked(source: Path, entry: str, argtypes: tuple, wrap: type, self_check) -> tuple:
    """(wrap(library), '') when `source` builds and loads and `self_check` passes on it, else
    (None, why); once per process. `entry` (returning int) takes `argtypes`."""
    lib, why = _library(source)
    if lib is None:
        return None, why
    fn = getattr(lib, entry)
    fn.restype, fn.argtypes = ctypes.c_int, list(argtypes)
    kernel = wrap(lib)
    why = self_check(kernel)
    return (None, why) if why else (kernel, "")


ATTENTION_MAX_QUERY = 8  # decode_attention.c's MAX_QUERY


@dataclass(frozen=True)
class AttentionKernel:
    """The loaded `decode_attention_f32` library (see `decode_attention.c`)."""

    lib: ctypes.CDLL

    def run(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        scale: float,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
        threads: int | None = None,
    ) -> torch.Tensor | None:
        """The attention contract for a decode-like batch (each sequence's last 1 to
        ATTENTION_MAX_QUERY tokens: a decode step, or a speculative step's last token and
        drafts): query fp32 [T, Hq, D] and fp32 caches [NB, BS, Hk, D] (contiguous), int32
        contiguous block_tables [S, max_blocks] (rows may be strided), seq_lens [S] and
        query_start_loc [S + 1]. Returns [T, Hq, D], or None when the batch is not such a one.
        The caller checked shapes and dtypes (`cattention.c_attention`); lengths and block ids
        are checked here."""
        t, hq, d = query.shape
        s = seq_lens.shape[0]
        nb, bs, hk, _ = key_cache.shape
        out = torch.empty(t, hq, d, dtype=torch.float32)
        rc = self.lib.decode_attention_f32(
            query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
            block_tables.data_ptr(), block_tables.stride(0), block_tables.shape[1],
            seq_lens.data_ptr(), query_start_loc.data_ptr(), s, hq, hk, d, bs, nb, scale,
            sliding_window or 0, soft_cap or 0.0, out.data_ptr(),
            max(1, threads or torch.get_num_threads()),
        )  # fmt: skip
        if rc == -1:
            return None
        if rc in (-2, -3):
            raise attention_input_error(rc, block_tables.shape[1], bs, nb, seq_lens)
        if rc != 0:
            raise RuntimeError(
                f"decode_attention_f32 rejected query {tuple(query.shape)} (code {rc})"
            )
        return out


def _attention_self_check(kernel: AttentionKernel) -> str:
    """'' when the kernel gives the reference's values within fp32 roundoff on random data
    (GQA, two pages, a window, a soft cap), else why not."""
    from backends.cpu.attention import paged_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, generator=g)
    kc, vc = torch.randn(5, 4, 2, 8, generator=g), torch.randn(5, 4, 2, 8, generator=g)
    tables = torch.tensor([[3, 1], [0, 4]], dtype=torch.int32)
    lens = torch.tensor([6, 3], dtype=torch.int32)
    q4 = torch.randn(4, 4, 8, generator=g)
    decode, spec = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 3, 4])
    for window, cap in ((None, None), (4, 5.0)):
        for query, qsl in ((q, decode), (q4, spec.to(torch.int32))):  # 3 + 1 query tokens
            got = kernel.run(query, kc, vc, tables, lens, qsl, 0.35, window, cap, threads=2)
            want = paged_attention(query, kc, vc, tables, lens, qsl, 0.35, window, cap)
            if got is None or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                return "self-check failed: the outputs differ from the reference's"
    return ""


def load_attention_kernel() -> tuple[AttentionKernel | None, str]:
    """(the decode attention kernel, '') or (None, why not here); HAL_CPU_C_KERNELS read at
    each call."""
    if not enabled():
        return None, f"{ENV}=0"
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    args = (
        p, p, p, p, i64, i64, p, p, i64, i64, i64, i64, i64, i64, f32, i64, f32, p, ctypes.c_int,
    )  # fmt: skip
    return _checked(
        ATTENTION_SOURCE, "decode_attention_f32", args, AttentionKernel, _attention_self_check
    )


# Rows the C RMSNorm takes: below 16 values torch's sum has no whole vectors to interleave, and
# from 32768 values (one row) torch splits the sum across threads; 16384 covers every hidden size
# of the served model families.
RMS_NORM_MIN, RMS_NORM_MAX = 16, 16384
_RMS_NORM_LANES = (8, 16, 4)  # vector widths torch's sum may use (AVX2 / AVX-512 / NEON)


@dataclass
class RmsNormKernel:
    """The loaded `rms_norm_f32` library (see `rms_norm.c`); `lanes`: the vector width whose
    order gave torch's bits in the self-check."""

    lib: ctypes.CDLL
    lanes: int = 0

    def takes(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether `run` takes these: fp32 contiguous CPU x (and residual), an fp32 contiguous
        weight, rows of RMS_NORM_MIN..RMS_NORM_MAX values."""
        tensors = (x, weight) if residual is None else (x, weight, residual)
        return (
            RMS_NORM_MIN <= x.shape[-1] <= RMS_NORM_MAX
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
            and x.device.type == "cpu"
        )

    def run(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`norm.rms_norm` for inputs `takes` accepts (the caller checked them and the contract's
        shapes): y, or (y, x + residual)."""
        n = x.shape[-1]
        rows = x.numel() // n if n else 0
        y = torch.empty_like(x)
        h = torch.empty_like(x) if residual is not None else None
        rc = self.lib.rms_norm_f32(
            x.data_ptr(), residual.data_ptr() if h is not None else None,
            h.data_ptr() if h is not None else None, weight.data_ptr(), y.data_ptr(), rows, n,
            eps, self.lanes,
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"rms_norm_f32 rejected x {tuple(x.shape)} (code {rc})")
        return y if h is None else (y, h)


def _rms_norm_self_check(kernel: RmsNormKernel) -> str:
    """'' when some lane width gives F.rms_norm's bits (and x + residual's) on random rows of
    every size class the kernel takes (setting kernel.lanes to it), else why not."""
    import torch.nn.functional as F  # noqa: N812, PLC0415

    g = torch.Generator().manual_seed(0)
    cases = []
    for n in (16, 23, 64, 100, 576, 1000, 2048, 4096, 5120, RMS_NORM_MAX):
        for rows, scale in ((1, 1.0), (3, 40.0), (2, 1e-3)):
            x = torch.randn(rows, n, generator=g) * scale
            r = torch.randn(rows, n, generator=g) * scale
            w = torch.randn(n, generator=g)
            cases.append((x, r, w, F.rms_norm(x + r, (n,), w, 1e-5), F.rms_norm(x, (n,), w, 1e-6)))
    for lanes in _RMS_NORM_LANES:
        kernel.lanes = lanes
        if all(
            torch.equal(kernel.run(x, w, 1e-5, r)[0], want_r)
            and torch.equal(kernel.run(x, w, 1e-6), want)
            for x, r, w, want_r, want in cases
        ):
            return ""
    kernel.lanes = 0
    return "self-check failed: no lane width gives torch's RMSNorm bits"


def load_rms_norm_kernel() -> tuple[RmsNormKernel | None, str]:
    """(the RMSNorm kernel, '') or (None, why not here); HAL_CPU_C_KERNELS read at each call."""
    if not enabled():
        return None, f"{ENV}=0"
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    args = (p, p, p, p, p, i64, i64, ctypes.c_float, ctypes.c_int)
    return _checked(RMS_NORM_SOURCE, "rms_norm_f32", args, RmsNormKernel, _rms_norm_self_check)


@dataclass(frozen=True)
class DecoderLayerKernel:
    """The loaded `decoder_layer_f32` library (see `decoder_layer.c`): one decoder layer of a
    decode step through the other kernels' function pointers (`backends/cpu/decoder.py`)."""

    lib: ctypes.CDLL


def _no_self_check(kernel: DecoderLayerKernel) -> str:
    # It only calls the other kernels (each checked when loaded) in an order; the bitwise tests
    # against the engine's modules (tests/backends/cpu/test_fused_decoder.py) check that order.
    return ""


def load_decoder_layer_kernel() -> tuple[DecoderLayerKernel | None, str]:
    """(the decoder-layer driver, '') or (None, why not here); HAL_CPU_C_KERNELS read at each
    call."""
    if not enabled():
        return None, f"{ENV}=0"
    p = ctypes.c_void_p
    args = (p, p, p, p, p, p, ctypes.c_int64)
    return _checked(DECODER_SOURCE, "decoder_layer_f32", args, DecoderLayerKernel, _no_self_check)
