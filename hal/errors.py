"""Errors for user mistakes: one line that names the bad value and the valid choices.

The `hal` command prints these without a traceback; everything else is a bug and keeps its trace.
"""


class HalError(Exception):
    """A user-facing error: bad input, a forced choice that cannot run, an unknown name."""
