"""Hardware abstraction layer: capabilities, the backend interface, and selection with reasons."""

from hal.backend import OP_FAMILIES, Backend, BackendInfo, GraphRunner
from hal.capabilities import DTYPE_NAMES, FP8_FORMATS, Capabilities, LibraryInfo
from hal.errors import HalError
from hal.registry import REGISTRY, Candidate, Choice, Selection, SelectionError, env_choice
from hal.select import load_backend, select_backend, select_ops

__all__ = [
    "DTYPE_NAMES",
    "FP8_FORMATS",
    "OP_FAMILIES",
    "REGISTRY",
    "Backend",
    "BackendInfo",
    "Candidate",
    "Capabilities",
    "Choice",
    "GraphRunner",
    "HalError",
    "LibraryInfo",
    "Selection",
    "SelectionError",
    "env_choice",
    "load_backend",
    "select_backend",
    "select_ops",
]
