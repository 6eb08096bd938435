"""Probes of optional libraries: installed version, whether usable here, and why not.

Versions come from `importlib.metadata` (no import). Only a library whose usability hangs on a
compiled extension or a driver (flash_attn, xformers, flashinfer, pynvml, amdsmi) is imported, and
only when installed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable

from hal.capabilities import LibraryInfo

logger = logging.getLogger(__name__)

# Report order. Keys are the names candidates ask for (`caps.has_library("flash_attn")`).
LIBRARY_NAMES: tuple[str, ...] = (
    "triton",
    "flash_attn",
    "xformers",
    "flashinfer",
    "pynvml",
    "amdsmi",
    "xgrammar",
)

# name -> (top-level module, distributions that may provide it)
_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "triton": ("triton", ("triton", "pytorch-triton", "pytorch-triton-rocm")),
    "flash_attn": ("flash_attn", ("flash-attn", "flash_attn")),
    "xformers": ("xformers", ("xformers",)),
    "flashinfer": ("flashinfer", ("flashinfer-python", "flashinfer")),
    "pynvml": ("pynvml", ("nvidia-ml-py", "pynvml")),
    "amdsmi": ("amdsmi", ("amdsmi",)),
    "xgrammar": ("xgrammar", ("xgrammar",)),  # structured outputs (engine.structured_output)
}


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _version(dists: tuple[str, ...]) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


# Usability checks, run only when the module is installed: each returns "" or the reason.
def _usable_when_installed() -> str:
    # triton: its interpreter runs anywhere (GPU use is the backends' vendor check); xgrammar:
    # the engine's own host-side use
    return ""


def _check_flash_attn() -> str:
    # The package imports its compiled kernels from this extension (flash_attn_interface.py).
    try:
        importlib.import_module("flash_attn_2_cuda")
    except Exception as exc:  # any failure to load a compiled extension means "cannot use"
        return (
            f"installed, but its CUDA extension flash_attn_2_cuda does not load ({_one_line(exc)})"
        )
    return ""


def _check_xformers() -> str:
    try:
        xformers = importlib.import_module("xformers")
    except Exception as exc:
        return f"installed, but does not import ({_one_line(exc)})"
    has_cpp = getattr(xformers, "_has_cpp_library", None)
    if has_cpp is None:  # older releases: probe the extension module itself
        try:
            importlib.import_module("xformers._C")
            has_cpp = True
        except Exception:
            has_cpp = False
    if callable(has_cpp):
        has_cpp = has_cpp()
    return "" if has_cpp else "installed, but its C++/CUDA extension (xformers._C) does not load"


def _check_flashinfer() -> str:
    try:
        importlib.import_module("flashinfer")
    except Exception as exc:
        return f"installed, but does not import ({_one_line(exc)})"
    return ""


def _check_pynvml() -> str:
    try:
        pynvml = importlib.import_module("pynvml")
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception as exc:
        return f"installed, but NVML does not initialize (no NVIDIA driver?) ({_one_line(exc)})"
    return ""


def _check_amdsmi() -> str:
    try:
        amdsmi = importlib.import_module("amdsmi")
        amdsmi.amdsmi_init()
        amdsmi.amdsmi_shut_down()
    except Exception as exc:
        return f"installed, but amdsmi does not initialize (no amdgpu driver?) ({_one_line(exc)})"
    return ""


_CHECKS: dict[str, Callable[[], str]] = {
    "triton": _usable_when_installed,
    "flash_attn": _check_flash_attn,
    "xformers": _check_xformers,
    "flashinfer": _check_flashinfer,
    "pynvml": _check_pynvml,
    "amdsmi": _check_amdsmi,
    "xgrammar": _usable_when_installed,
}


def probe_library(name: str) -> LibraryInfo:
    """Version, usability and reason for one library of LIBRARY_NAMES."""
    if name not in _SOURCES:
        raise ValueError(f"unknown library {name!r}; valid: {', '.join(LIBRARY_NAMES)}")
    module, dists = _SOURCES[name]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        return LibraryInfo(name, None, False, f"not importable ({_one_line(exc)})")
    if spec is None:
        return LibraryInfo(name, None, False, "not installed")
    reason = _CHECKS[name]()
    if reason:
        logger.info("library %s: %s", name, reason)
    return LibraryInfo(name, _version(dists), not reason, reason)


def probe_libraries(names: tuple[str, ...] = LIBRARY_NAMES) -> dict[str, LibraryInfo]:
    """Every library of `names`, probed in this Python environment."""
    return {name: probe_library(name) for name in names}
