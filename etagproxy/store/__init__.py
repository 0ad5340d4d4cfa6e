"""Version stores: `open_store` picks the implementation a config names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from etagproxy.store.base import (
    BeginResult,
    BeginStatus,
    Cause,
    EndResult,
    KeyInfo,
    Observation,
    Outcome,
    Replay,
    StoreError,
    Version,
    VersionStore,
    WriteCondition,
    evaluate_write,
)

if TYPE_CHECKING:
    from etagproxy.config import StoreConfig

__all__ = [
    "BeginResult",
    "BeginStatus",
    "Cause",
    "EndResult",
    "KeyInfo",
    "Observation",
    "Outcome",
    "Replay",
    "StoreError",
    "Version",
    "VersionStore",
    "WriteCondition",
    "evaluate_write",
    "open_store",
]


def open_store(cfg: StoreConfig, *, timeout_s: float) -> VersionStore:
    """The store `cfg` describes; connections are made lazily, on first use."""
    if cfg.kind == "memory":
        from etagproxy.store.memory import MemoryStore

        return MemoryStore(token_ttl_ms=int(cfg.token_ttl * 1000))
    # Imported here so that memory:// never loads redis-py.
    from etagproxy.store.redis import RedisStore

    return RedisStore.from_config(cfg, timeout_s=timeout_s)
