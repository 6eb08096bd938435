"""One OpenMP master per process: torch's CPU ops and the CPU backend's C kernels run their
parallel regions on libgomp (torch's copy, shared by soname), which keeps a pool of worker
threads for every thread that ever opened a region. Once the process holds more of those threads
than CPUs, libgomp stops spinning between regions (1000 spins instead of ~300k) and every region
wakes its workers through futexes: after a model is loaded on the main thread and then stepped
on the async engine's thread, a 2-core machine ran the default model's decode 2x slower (35 ms
a token against 16). Giving the loading thread's pool back before another thread takes over the
work keeps one pool."""

from __future__ import annotations

import ctypes
import functools
import logging

logger = logging.getLogger(__name__)

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: omp_pause_soft = 1, omp_pause_hard = 2


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    try:  # torch's own when torch loaded it (the same soname), else the system's
        lib = ctypes.CDLL("libgomp.so.1")
    except OSError:
        return None
    if not hasattr(lib, "omp_pause_resource_all"):  # libgomp before GCC 9
        return None
    lib.omp_pause_resource_all.restype = ctypes.c_int
    lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
    return lib


def release_thread_pool() -> bool:
    """Give back the calling thread's OpenMP worker threads (OpenMP 5's
    `omp_pause_resource_all(omp_pause_hard)`); a later parallel region on this thread makes a new
    pool. Returns whether libgomp did it (False: no libgomp here, e.g. an Intel OpenMP torch, or
    one too old to pause). Call it outside any parallel region, as the thread hands its work to
    another."""
    lib = _libgomp()
    if lib is None:
        return False
    return lib.omp_pause_resource_all(OMP_PAUSE_HARD) == 0
