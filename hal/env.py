"""Boolean switches read from the environment (HAL_*=1/0, true/false, on/off, yes/no)."""

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
