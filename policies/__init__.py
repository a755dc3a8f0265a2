"""Policies: the SelfFlow policy class, its server and its small client.

Importing this package never imports torch (the simulator's environment has none): the numpy-only
pieces are imported directly, `SelfFlowPolicy` is loaded from policies.selfflow_policy on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from policies.chunking import ActionQueue, TemporalEnsembler
from policies.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ProtocolError, packb, unpackb
from policies.validation import Limits, validate_observation

if TYPE_CHECKING:
    from policies.client import PolicyClient, PolicyServerError, RemotePolicy
    from policies.selfflow_policy import SelfFlowPolicy

_LAZY = {
    "SelfFlowPolicy": "policies.selfflow_policy",  # torch
    "PolicyClient": "policies.client",  # websockets
    "PolicyServerError": "policies.client",
    "RemotePolicy": "policies.client",
    "PolicyServer": "policies.serve",
}

__all__ = ["ActionQueue", "TemporalEnsembler", "MAX_MESSAGE_BYTES", "PROTOCOL_VERSION", "ProtocolError", "packb",
           "unpackb", "Limits", "validate_observation", "SelfFlowPolicy", "PolicyClient", "PolicyServerError",
           "RemotePolicy", "PolicyServer"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'policies' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
