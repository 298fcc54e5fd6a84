"""Event histories for tests: hypothesis strategies for any event the log can hold (built from the
types' shapes), and a deterministic mix of every area's events (`history`)."""

from __future__ import annotations

import random
from typing import Any

import msgspec
from hypothesis import strategies as st

from eventstore.events import (
    EVENT_TYPES,
    ApiKeyCreated,
    ApiKeyUsed,
    BaseEvent,
    LicenseIssued,
    LicenseUsed,
    MessageRead,
    MessageSent,
    NodeDeregistered,
    NodeHeartbeat,
    NodeRegistered,
    NodeStatusUpdated,
    TelemetryRecorded,
    TenantCreated,
    TenantUpdated,
    UpdatePublished,
    UpdateWithdrawn,
    UserCreated,
    UserRoleGranted,
)


def _for_type(t: msgspec.inspect.Type) -> st.SearchStrategy[Any]:
    if isinstance(t, msgspec.inspect.StrType):
        return _ids
    if isinstance(t, msgspec.inspect.BoolType):
        return st.booleans()
    if isinstance(t, msgspec.inspect.IntType):
        return st.integers(0, 5)
    if isinstance(t, msgspec.inspect.FloatType):
        return st.floats(0, 1e9, allow_nan=False)
    if isinstance(t, msgspec.inspect.NoneType):
        return st.none()
    if isinstance(t, msgspec.inspect.UnionType):
        return st.one_of(*(_for_type(x) for x in t.types))
    if isinstance(t, msgspec.inspect.ListType):
        return st.lists(_for_type(t.item_type), max_size=3)
    if isinstance(t, msgspec.inspect.VarTupleType):
        return st.lists(_for_type(t.item_type), max_size=3).map(tuple)
    if isinstance(t, msgspec.inspect.DictType):
        return st.dictionaries(_ids, _ids, max_size=2)
    if isinstance(t, msgspec.inspect.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, msgspec.inspect.StructType):
        return _struct(t)
    return st.none()


def _struct(info: msgspec.inspect.StructType) -> st.SearchStrategy[Any]:
    fields = {f.name: _for_type(f.type) for f in info.fields}
    return st.fixed_dictionaries(fields).map(lambda kw: info.cls(**kw))


def event_strategy() -> st.SearchStrategy[BaseEvent]:
    infos = [msgspec.inspect.type_info(cls) for cls in EVENT_TYPES.values()]
    return st.one_of(*(_struct(i) for i in infos))  # type: ignore[arg-type]


def history(n: int, seed: int = 7) -> list[BaseEvent]:
    """A deterministic mix of the areas' events (nodes, tenants, licenses, updates, users,
    telemetry, messages)."""
    rnd = random.Random(seed)
    nodes = [f"node-{i}" for i in range(8)]
    out: list[BaseEvent] = []
    makers = [
        lambda: NodeRegistered(
            node_id=rnd.choice(nodes),
            name="n",
            node_type=rnd.choice("ab"),
            public_key="k",
            capabilities=[rnd.choice(["x", "y"])],
            metadata={"region": rnd.choice(["eu", "us"])},
        ),
        lambda: NodeStatusUpdated(node_id=rnd.choice(nodes), status=rnd.choice(["up", "down"])),
        lambda: NodeHeartbeat(node_id=rnd.choice(nodes), metrics={"cpu": rnd.random()}),
        lambda: NodeDeregistered(node_id=rnd.choice(nodes)),
        lambda: TenantCreated(tenant_id=f"t{rnd.randrange(4)}", name="T"),
        lambda: TenantUpdated(tenant_id=f"t{rnd.randrange(4)}", active=rnd.random() < 0.5),
        lambda: LicenseIssued(
            license_id=f"l{rnd.randrange(4)}",
            tenant_id=f"t{rnd.randrange(4)}",
            key_hash=f"h{rnd.randrange(99)}",
            key_last4="abcd",
            expires_at=2e9,
        ),
        lambda: LicenseUsed(license_id=f"l{rnd.randrange(4)}", tenant_id="t0", usage_count=1),
        lambda: UpdatePublished(
            update_id=f"u{rnd.randrange(5)}",
            version=f"1.{rnd.randrange(5)}.0",
            changelog="",
            sha256="0" * 64,
            file_size=1,
        ),
        lambda: UpdateWithdrawn(update_id=f"u{rnd.randrange(5)}"),
        lambda: UserCreated(
            user_id=f"usr_{rnd.randrange(5)}",
            username=f"u{rnd.randrange(5)}",
            password_hash="scrypt$secret",
        ),
        lambda: UserRoleGranted(user_id=f"usr_{rnd.randrange(5)}", role="viewer"),
        lambda: TelemetryRecorded(
            tenant_id=f"t{rnd.randrange(4)}",
            uptime=1.0,
            active_users=rnd.randrange(9),
            exercises_completed_today=0,
            ai_latency=rnd.random(),
        ),
        lambda: MessageSent(
            message_id=f"m{len(out)}",
            from_node=rnd.choice(nodes),
            to_nodes=nodes[:3],
            message_type="t",
            content={"k": 1},
        ),
        lambda: MessageRead(message_id=f"m{rnd.randrange(max(1, len(out)))}", node_id=nodes[0]),
    ]
    for i in range(n):
        out.append(rnd.choice(makers)())
        if i % 97 == 13:  # API keys too, without drawing from `rnd` (the rest stays as it was)
            key = f"apk_{i % 4}"
            out.append(
                ApiKeyCreated(
                    key_id=key, name="k", owner_id="usr_1", scopes=["nodes:read"], key_hash="h"
                )
                if i % 2
                else ApiKeyUsed(key_id=key)
            )
    return out[:n]


_ids = st.sampled_from(["a", "b", "c", "admin", "operator", "viewer", "role:a", "role:viewer"])
