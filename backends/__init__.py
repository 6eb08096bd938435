"""Backends: cpu (the reference), cuda and rocm. Importing this declares their candidates."""

from backends import cpu as _cpu  # noqa: F401  (registers candidates)
from backends import cuda as _cuda  # noqa: F401
from backends import rocm as _rocm  # noqa: F401
