"""Choosing a backend and its per-op implementations for a `Capabilities`, and loading it."""

from __future__ import annotations

import importlib
import logging

from hal.backend import Backend
from hal.capabilities import Capabilities
from hal.registry import REGISTRY, Registry, Selection, env_choice

logger = logging.getLogger(__name__)


def _ensure_registered() -> None:
    # Backends declare their candidates on import; declarations are cheap (no kernels load).
    importlib.import_module("backends")


def select_backend(
    caps: Capabilities, configured: str | None = None, registry: Registry = REGISTRY
) -> Selection:
    """Pick the backend for `caps`; `configured` (or HAL_BACKEND) prefers or requires one."""
    _ensure_registered()
    return registry.select("backend", caps, choice=env_choice("backend", configured))


def select_ops(
    backend: str,
    caps: Capabilities,
    configured: dict[str, str] | None = None,
    registry: Registry = REGISTRY,
) -> dict[str, Selection]:
    """Per-op-family selections inside `backend`; HAL_<FAMILY>_BACKEND or config can force one."""
    _ensure_registered()
    configured = configured or {}
    return {
        family: registry.select(
            family, caps, scope=backend, choice=env_choice(family, configured.get(family))
        )
        for family in registry.families(backend)
    }


def _import_target(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_backend(
    caps: Capabilities,
    device: str | None = None,
    configured: str | None = None,
    op_config: dict[str, str] | None = None,
    registry: Registry = REGISTRY,
) -> Backend:
    """Select and construct the backend; log every choice and every passed-over candidate."""
    sel = select_backend(caps, configured, registry)
    cand = next(c for c in registry.candidates("backend") if c.name == sel.chosen)
    cls = _import_target(cand.target)
    ops = select_ops(sel.chosen, caps, op_config, registry)
    backend: Backend = cls(caps, device or cls.default_device, ops)
    backend.info.selections = {"backend": sel, **ops}
    for line in backend.describe():
        logger.debug("%s", line)
    return backend
