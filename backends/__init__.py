"""Backends: cpu (the reference), cuda and rocm. Importing this declares their candidates."""

from backends import cpu as _cpu  # noqa: F401  (registers candidates)
