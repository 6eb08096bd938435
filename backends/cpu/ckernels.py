"""The CPU engine's C kernels, built from `backends/cpu/csrc` with the machine's C compiler at
first use and loaded through ctypes (no torch headers: a build takes about a second).

`codes_gemm` is the small-M GEMM on GGUF weights kept as int8 codes with per-group fp32 scales
and offsets (the "tiled" layout of `backends/cpu/gguf_fast.py`): it reads 1 byte per weight where
the fp32 paths read 4, and is what the CPU backend runs for decode-sized batches of GGUF models
(M <= its MAX_M). fp32 arithmetic throughout; the summation order differs from x @ w.T (no fp32
weight is formed: per group, scale * sum(codes * x) + offset * sum(x)).

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
        self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None
    ) -> CodesWeight:
        """The weight codes int8 [N, K] * scale fp32 [N, K / G(, 1)] + offset (same shape, or
        None), all contiguous CPU tensors, checked once for every later call (`CodesWeight`)."""
        n, k = codes.shape
        groups = scale.shape[1] if scale.dim() >= 2 else 0
        group = k // groups if groups else 0
        if codes.dtype != torch.int8 or scale.dtype != torch.float32:
            raise ValueError(
                f"codes_gemm: codes {codes.dtype}, scale {scale.dtype}: expected int8, float32"
            )
        if scale.shape[0] != n or not groups or group * groups != k:
            raise ValueError(
                f"codes_gemm: codes {tuple(codes.shape)} and scale {tuple(scale.shape)} do not "
                f"describe a [{n}, {k}] weight in whole groups"
            )
        if offset is not None and (offset.dtype != torch.float32 or offset.shape != scale.shape):
            raise ValueError(
                f"codes_gemm: offset {offset.dtype} {tuple(offset.shape)}: expected float32 "
                f"{tuple(scale.shape)} (scale's shape)"
            )
        if not self.takes(1, k, group):
            raise ValueError(
                f"codes_gemm: groups of {group} values: takes groups dividing K = {k} in "
                f"multiples of {max(self.vector_width, 1)}"
            )
        tensors = (codes, scale) + ((offset,) if offset is not None else ())
        if not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors):
            raise ValueError("codes_gemm: every tensor must be a contiguous CPU tensor")
        return CodesWeight(self, codes, scale, offset, n, k, group)

    def __call__(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor | None,
        threads: int | None = None,
    ) -> torch.Tensor:
        """y fp32 [M, N] = x fp32 [M, K] times the weight codes int8 [N, K] * scale fp32
        [N, K / G(, 1)] + offset (same shape, or None), all contiguous CPU tensors."""
        return self.bind(codes, scale, offset)(x, threads)


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
        rc = self.kernel.lib.codes_gemm(
            self.codes.data_ptr(), self.scale.data_ptr(),
            offset.data_ptr() if offset is not None else None, self.n, k, self.group,
            x.data_ptr(), k, m, y.data_ptr(), self.n, None,
            max(1, threads or torch.get_num_threads()),
        )  # fmt: skip
        if rc != 0:
            why = "no memory for its scratch" if rc == -2 else "arguments it cannot take"
            raise RuntimeError(
                f"codes_gemm: M={m}, N={self.n}, K={k}, group {self.group}: {why} (code {rc})"
            )
        return y


def _self_check(kernel: CodesKernel) -> str:
    """'' when the kernel gives x @ w.T within fp32 accuracy on random data, else why not."""
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
    return ""


def load_codes_kernel() -> tuple[CodesKernel | None, str]:
    """(the kernel, '') or (None, the reason it is not used here): HAL_CPU_C_KERNELS read at
    each call, the library built, loaded and checked once per process."""
    if not enabled():
        return None, f"{ENV}=0"
    return _load()


@functools.cache
def _load() -> tuple[CodesKernel | None, str]:
    cc, version = _compiler()
    if cc is None:
        return None, version
    path, why = _build(cc, version, SOURCE)
    if path is None:
        return None, why
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"loading {path} failed: {e}"
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.codes_gemm.restype = ctypes.c_int
    lib.codes_gemm.argtypes = [p, p, p, i64, i64, i64, p, i64, i64, p, i64, p, ctypes.c_int]
    kernel = CodesKernel(
        lib, path, lib.codes_gemm_max_m(), lib.codes_gemm_vector_width(),
        bool(lib.codes_gemm_openmp()),
    )  # fmt: skip
    why = _self_check(kernel)
    if why:
        return None, why
    return kernel, ""
