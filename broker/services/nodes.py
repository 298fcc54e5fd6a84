"""Nodes: registration, challenge/response login, status, heartbeats, deregistration, discovery.

Login (DESIGN.md §6, seed 001): `issue_challenge` hands out a self-contained challenge,
`<b64url(node_id|nonce|expiry)>.<b64url(HMAC-SHA256)>`, keyed by a secret derived from the token
signing key, so any instance sharing that key and the log can check it. `login` burns it on every
attempt, right or wrong, by recording `auth.challenge_used` on the stream `chl:<hash of nonce>` with
expected version 0: the log refuses a second use on every instance. Outstanding challenges are
bounded by their lifetime and by a per-node count of issued, unused ones kept in memory.
The node signs the challenge text with RSA-PSS (MGF1-SHA-256, SHA-256; any salt length is accepted,
the seed uses the maximum) and sends the signature hex-encoded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import gc
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import msgspec
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from broker.config import AuthConfig
from broker.errors import (
    AuthenticationFailed,
    Conflict,
    NotFound,
    RateLimited,
    Unavailable,
    ValidationFailed,
)
from broker.pagination import PageQuery
from broker.runtime import Runtime
from broker.services.tokens import TokenPair, TokenService
from eventstore.base import ConcurrencyError
from eventstore.events import (
    ChallengeUsed,
    NodeDeregistered,
    NodeHeartbeat,
    NodeLoggedIn,
    NodeRegistered,
    NodeStatusUpdated,
)
from eventstore.timestamps import iso
from projections.index_snapshot import unpack_step
from projections.node_index import ORDERS
from projections.nodes import Node, NodesProjection, Presence

NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # no ":": other streams use it
# Field types of heartbeats and status updates, shared by the HTTP bodies and the WebSocket ops.
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Timestamp = Annotated[str, msgspec.Meta(max_length=64)] | float
MAX_RSA_BITS = 8192
MAX_RSA_EXPONENT = 2**32  # verification time grows with the exponent: refuse absurd ones
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
_SHA256 = hashes.SHA256()

ORDERS_CHECK = 10.0  # seconds between two looks for discovery orders to build


class NodeView(msgspec.Struct, kw_only=True):
    """A node as the API shows it: what it registered and reported, plus its presence."""

    node_id: str
    name: str
    type: str
    capabilities: list[str]
    endpoint: str
    metadata: dict[str, Any]
    status: str
    load: float | None
    available_resources: dict[str, Any]
    last_seen: str | float | None
    registered_at: str
    updated_at: str
    presence: Presence
    online: bool
    last_heartbeat_at: str | None
    heartbeat: dict[str, Any] | None
    last_login_at: str | None
    public_key: str | msgspec.UnsetType = msgspec.UNSET


class NodesQuery(PageQuery, kw_only=True):
    sort_by: (
        Literal["registered_at", "node_id", "name", "type", "status", "load", "last_heartbeat_at"]
        | None
    ) = None
    type: str | None = None
    capabilities: str | None = None  # comma-separated: every one is required
    region: str | None = None
    status: str | None = None
    online: bool | None = None
    presence: Literal["online", "stale", "offline"] | None = None


class NodeList(msgspec.Struct):
    nodes: list[NodeView]
    total: int
    skip: int
    limit: int
    has_more: bool


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_public_key(pem: str, min_bits: int) -> rsa.RSAPublicKey:
    """An RSA public key from PEM, or 422 naming `public_key`."""

    def invalid(reason: str) -> ValidationFailed:
        return ValidationFailed(
            f"public_key: {reason}", details=[{"field": "public_key", "message": reason}]
        )

    try:
        key = serialization.load_pem_public_key(pem.strip().encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise invalid("not a PEM-encoded public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise invalid("must be an RSA key")
    if key.key_size < min_bits:
        raise invalid(f"RSA key of {key.key_size} bits; at least {min_bits} required")
    if key.key_size > MAX_RSA_BITS:
        raise invalid(f"RSA key of {key.key_size} bits; at most {MAX_RSA_BITS} accepted")
    if key.public_numbers().e > MAX_RSA_EXPONENT:
        raise invalid("RSA public exponent too large")
    return key


class NodeService:
    """The application functions of nodes; one per application."""

    def __init__(self, config: AuthConfig, tokens: TokenService) -> None:
        self.config = config
        self.tokens = tokens
        self.online_within = config.heartbeat_interval * config.online_after_missed
        self.stale_within = config.heartbeat_interval * config.stale_after_missed
        # True until the background task has built every discovery order and presence window
        # (queries are exact meanwhile, but answer from a slice of the work: slower)
        self.indices_building = True
        # Set once the application has started (`broker.app`): the background build waits for
        # it, so that its slices do not take turns with the rest of the start-up's steps.
        self.started = asyncio.Event()
        self._runtime: Runtime | None = None
        self._challenge_key = b""
        self._outstanding: dict[str, dict[str, float]] = {}  # node id -> nonce hex -> expiry
        self._keys: dict[str, tuple[int, rsa.RSAPublicKey]] = {}  # node id -> (generation, key)
        self.clock: Callable[[], float] = time.time  # tests move it

    def start(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._challenge_key = self.tokens.derive_secret(b"broker node login challenge v1")

    def stop(self) -> None:
        self._runtime = None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise Unavailable("the node service is not started")
        return self._runtime

    # --- registration ---

    async def register(
        self,
        *,
        node_id: str,
        name: str,
        type: str,
        public_key: str,
        capabilities: Sequence[str] = (),
        endpoint: str = "",
        metadata: dict[str, Any] | None = None,
    ) -> Node:
        """Register a node (201); 409 if the id is taken, 422 on a bad key."""
        key = parse_public_key(public_key, self.config.min_rsa_bits)
        rt = self.runtime
        if rt.nodes.get(node_id) is not None:
            raise Conflict(f"Node already exists: {node_id}")
        # A deregistered id may register again: its stream goes on from where it stopped.
        expected = await rt.store.stream_version(node_id) if node_id in rt.nodes.retired else 0
        event = NodeRegistered(
            node_id=node_id,
            name=name,
            node_type=type,
            public_key=public_key.strip(),
            capabilities=list(dict.fromkeys(capabilities)),
            endpoint=endpoint,
            metadata=metadata or {},
        )
        try:
            await rt.record([event], expected_version=expected)
        except ConcurrencyError:
            raise Conflict(f"Node already exists: {node_id}") from None
        node = self.get(node_id)
        self._keys[node_id] = (node.generation, key)
        return node

    def get(self, node_id: str) -> Node:
        """The node, or 404."""
        node = self.runtime.nodes.get(node_id)
        if node is None:
            raise NotFound(f"Node not found: {node_id}")
        return node

    # --- login ---

    def issue_challenge(self, node_id: str) -> tuple[str, int]:
        """A fresh challenge for `node_id` and its lifetime in seconds."""
        self.get(node_id)
        now = self.clock()
        pending = self._outstanding.setdefault(node_id, {})
        for nonce_hex in [n for n, exp in pending.items() if exp <= now]:
            del pending[nonce_hex]
        if len(pending) >= self.config.max_outstanding_challenges:
            wait = max(1, math.ceil(min(pending.values()) - now))
            raise RateLimited(
                f"too many outstanding challenges for {node_id}; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        nonce = secrets.token_bytes(16)
        expires = math.ceil(now + self.config.challenge_ttl)
        payload = f"{node_id}|{nonce.hex()}|{expires}".encode()
        mac = hmac.digest(self._challenge_key, payload, "sha256")
        pending[nonce.hex()] = expires
        return f"{_b64(payload)}.{_b64(mac)}", int(self.config.challenge_ttl)

    def _open_challenge(self, challenge: str) -> tuple[str, str, float]:
        """(node id, nonce hex, expiry) of a challenge this broker issued, else 401."""
        try:
            payload_b64, mac_b64 = challenge.split(".")
            payload, mac = _unb64(payload_b64), _unb64(mac_b64)
            if not hmac.compare_digest(mac, hmac.digest(self._challenge_key, payload, "sha256")):
                raise ValueError("bad mac")
            node_id, nonce_hex, expires = payload.decode().split("|")
            return node_id, nonce_hex, float(expires)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise AuthenticationFailed("invalid challenge") from None

    async def login(self, node_id: str, challenge: str, signature: str) -> TokenPair:
        """Check a signed challenge and open a session (access + refresh tokens); 401 otherwise.
        Every attempt on a valid, unexpired challenge uses it up."""
        challenge_node, nonce_hex, expires = self._open_challenge(challenge)
        now = self.clock()
        if expires < now:
            raise AuthenticationFailed("challenge expired")
        challenge_id = "chl:" + hashlib.sha256(bytes.fromhex(nonce_hex)).hexdigest()[:32]
        if (pending := self._outstanding.get(challenge_node)) is not None:
            pending.pop(nonce_hex, None)
            if not pending:
                del self._outstanding[challenge_node]
        rt = self.runtime
        node = rt.nodes.get(node_id)
        if (
            node is None
            or challenge_node != node_id
            or not self._signature_ok(node, challenge, signature)
        ):
            try:
                await rt.record(
                    [ChallengeUsed(challenge_id=challenge_id, node_id=challenge_node)],
                    expected_version=0,
                )
            except ConcurrencyError:
                pass  # already used: refused all the same
            raise AuthenticationFailed("challenge verification failed")
        session = self.tokens.open_session("node", node_id, node.generation, now)
        events = [
            ChallengeUsed(challenge_id=challenge_id, node_id=node_id, accepted=True),
            NodeLoggedIn(node_id=node_id, family_id=session.family_id),
            *session.events,
        ]
        try:
            await rt.record(events, expected_version={challenge_id: 0, session.family_id: 0})
        except ConcurrencyError:
            raise AuthenticationFailed("challenge already used") from None
        return session.tokens

    def _signature_ok(self, node: Node, challenge: str, signature: str) -> bool:
        try:
            sig = bytes.fromhex(signature)
        except ValueError:
            return False
        cached = self._keys.get(node.node_id)
        if cached is None or cached[0] != node.generation:
            key = parse_public_key(node.public_key, 0)
            cached = self._keys[node.node_id] = (node.generation, key)
        try:
            cached[1].verify(sig, challenge.encode(), _PSS, _SHA256)
        except InvalidSignature:
            return False
        return True

    # --- status, heartbeats, deregistration ---

    async def update_status(
        self,
        node_id: str,
        *,
        by: str,
        status: str | None = None,
        load: float | None = None,
        available_resources: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        last_seen: str | float | None = None,
    ) -> Node:
        """Record a status update; `last_seen` is kept as the client sent it."""
        self.get(node_id)
        event = NodeStatusUpdated(
            node_id=node_id,
            status=status,
            load=load,
            available_resources=available_resources,
            metadata=metadata,
            last_seen=last_seen,
            by=by,
        )
        await self.runtime.record([event])
        return self.get(node_id)

    async def heartbeat(
        self,
        node_id: str,
        *,
        timestamp: str | float | None = None,
        status: str | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Node:
        """Record a heartbeat; presence is computed from the server time of this event."""
        self.get(node_id)
        event = NodeHeartbeat(
            node_id=node_id, timestamp=timestamp, status=status, metrics=metrics or {}
        )
        await self.runtime.record([event])
        return self.get(node_id)

    async def deregister(self, node_id: str, *, by: str, reason: str = "") -> None:
        """Remove a node from the registry; its tokens stop working at once."""
        self.get(node_id)
        await self.runtime.record([NodeDeregistered(node_id=node_id, by=by, reason=reason)])
        self._keys.pop(node_id, None)
        self._outstanding.pop(node_id, None)

    # --- queries ---

    def presence(self, node: Node, now: float) -> Presence:
        return node.presence(now, self.online_within, self.stale_within)

    async def decoded(self, sort_by: str | None = "node_id") -> None:
        """Before a query that reads every node's key (a sort by id, name or load, a prefix
        search): the nodes a snapshot restored still packed decoded a slice per turn of the
        loop, instead of all of them in the query's one step (seconds at 1M after a start)."""
        index = self.runtime.nodes.index
        if sort_by in ORDERS:
            while index.packed and unpack_step(index):
                await asyncio.sleep(0)

    def list_nodes(
        self, query: NodesQuery, now: float | None = None, nodes: NodesProjection | None = None
    ) -> NodeList:
        """One page of `GET /api/v1/nodes`: the filters, the sort and the window of `query`,
        presence at `now` (the service clock when not given), from `nodes` (default: the live
        projection; time travel passes one rebuilt as of a seq)."""
        if now is None:
            now = self.clock()
        caps = [c.strip() for c in (query.capabilities or "").split(",") if c.strip()]
        skip, limit = query.window()
        found, total = (nodes or self.runtime.nodes).page(
            type=query.type,
            capabilities=caps,
            region=query.region,
            status=query.status,
            presence=query.presence,
            online=query.online,
            now=now,
            online_within=self.online_within,
            stale_within=self.stale_within,
            sort_by=query.sort_by or "registered_at",
            descending=query.sort_order == "desc",
            skip=skip,
            limit=limit,
        )
        items = [self.view(n, now) for n in found]
        return NodeList(items, total, skip, limit, skip + len(items) < total)

    def view(self, node: Node, now: float, *, with_key: bool = False) -> NodeView:
        presence = self.presence(node, now)
        heartbeat = None
        if node.last_heartbeat_at is not None:
            heartbeat = {
                "timestamp": node.heartbeat_timestamp,
                "status": node.health,
                "metrics": node.metrics,
            }
        return NodeView(
            node_id=node.node_id,
            name=node.name,
            type=node.type,
            capabilities=node.capabilities,
            endpoint=node.endpoint,
            metadata=node.metadata,
            status=node.status,
            load=node.load,
            available_resources=node.available_resources,
            last_seen=node.last_seen,
            registered_at=iso(node.registered_at) or "",
            updated_at=iso(node.updated_at) or "",
            presence=presence,
            online=presence == "online",
            last_heartbeat_at=iso(node.last_heartbeat_at),
            heartbeat=heartbeat,
            last_login_at=iso(node.last_login_at),
            public_key=node.public_key if with_key else msgspec.UNSET,
        )


async def build_discovery_indices(service: NodeService) -> None:
    """The discovery orders and presence windows built in the background once the server is
    up, one bounded slice per turn of the loop (again after the indices are rebuilt)."""
    await service.started.wait()
    while True:
        index = service.runtime.nodes.index
        index.build_orders()
        for within in (service.online_within, service.stale_within):
            index.prepare_window(within, service.clock())
        unpacking = index.packed > 0  # nodes restored from a snapshot, still to be decoded
        while index.build_step():
            service.indices_building = True
            if unpacking:
                # What the slice built (decoded nodes, order blocks) lives as long as the
                # process, as what the start-up built, which `broker serve` froze: kept out of
                # the collector's sight too, or a full collection walks millions of them in one
                # step of the loop (1.4 s at 1M). Freezing is a splice of the collector's lists.
                gc.freeze()
            await asyncio.sleep(0)
        service.indices_building = False
        if unpacking:
            _return_freed_memory()
        await asyncio.sleep(ORDERS_CHECK)


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`; elsewhere
    nothing). The restored nodes' encoded slices (~600 bytes a node) are freed as the nodes
    are decoded, amid the decoded nodes: glibc keeps such pages (0.6 KiB a node at 1M)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
