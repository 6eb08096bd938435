"""Switches read from the environment: booleans (HAL_*=1/0, true/false, on/off, yes/no) and
launch shapes written AxBxC."""

from __future__ import annotations

import os


def env_flag(name: str) -> bool | None:
    """The switch `name` as True / False, or None when unset or empty; any other value is a
    ValueError naming the variable and what it takes."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{name}: {value!r} is not one of 1/0, true/false, on/off, yes/no")


def parse_dims(name: str, value: str | None, spelled: str, example: str) -> tuple[int, ...] | None:
    """`value` of the variable `name` as the integers of an AxBxC spelling (as many as the first
    word of `spelled` names, e.g. "NxWxS (block_n x num_warps x num_stages)"), or None when unset
    or empty; anything else is a ValueError naming the variable, the spelling and an `example`."""
    if not value:
        return None
    count = len(spelled.split()[0].split("x"))
    try:
        dims = tuple(int(v) for v in value.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != count:
        raise ValueError(f"{name}={value!r}: expected {spelled}, e.g. {example}")
    return dims
