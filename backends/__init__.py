"""Backends: cpu (the reference) and cuda. Importing this declares their candidates (cheap)."""

from backends import cpu as _cpu  # noqa: F401  (registers candidates)
from backends import cuda as _cuda  # noqa: F401
