"""The append-only event log: event types, the EventStore protocol and its backends."""

from __future__ import annotations

from eventstore.base import (
    ConcurrencyError,
    Envelope,
    EventNotEncodable,
    EventStore,
    IntegrityError,
    StoreConfig,
    StoreError,
    StoreLocked,
    StoreUnavailable,
    SubscriberTooSlow,
)

__all__ = [
    "ConcurrencyError",
    "Envelope",
    "EventNotEncodable",
    "EventStore",
    "IntegrityError",
    "StoreConfig",
    "StoreError",
    "StoreLocked",
    "StoreUnavailable",
    "SubscriberTooSlow",
    "open_store",
]


def open_store(config: StoreConfig, *, readonly: bool = False) -> EventStore:
    """Build (not yet open) the backend named by `config.backend`."""
    if config.backend == "memory":
        from eventstore.memory import MemoryStore

        return MemoryStore()
    if config.backend == "sqlite":
        from eventstore.sqlite import SqliteStore

        return SqliteStore(
            config.path,
            synchronous=config.synchronous,
            readonly=readonly,
            verify_on_open=config.verify_on_open and not readonly,
        )
    if config.backend == "nats":
        from eventstore.nats import NatsStore
        from eventstore.nats_tls import client_context

        return NatsStore(
            config.url,
            config.stream,
            subject_prefix=config.subject_prefix,
            replicas=config.replicas,
            max_age=config.max_age,
            readonly=readonly,
            tls=client_context(config),
        )
    raise ValueError(f"unknown store backend {config.backend!r} (sqlite, memory or nats)")
