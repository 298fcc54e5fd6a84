"""Authentication costs, in-process: token verification per request, and node logins.

    python -m bench.auth [--tokens 1000] [--verifications 200000] [--logins 2000]
                         [--concurrency 64] [--synchronous FULL]

Prints one line each:
- token verification: what `app[AUTHENTICATOR]` costs per request for node access tokens already
  seen (the per-token cache, plus the liveness checks against the projections), and for tokens seen
  for the first time (Ed25519 signature and claims, PyJWT);
- node login: full challenge -> verify round trips per second on the server side (challenge issue,
  HMAC check, RSA-PSS verification, two Ed25519 signatures, one durable append of three events to a
  SQLite log), with `--concurrency` logins in flight. The nodes' own RSA signing is done outside the
  timed part (it is the client's work).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bench.common import machine, run
from broker.config import AuthConfig
from broker.runtime import Runtime
from broker.services.nodes import NodeService
from broker.services.tokens import TokenPair, TokenService
from eventstore.sqlite import SqliteStore

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


async def setup(
    directory: Path, nodes: int, synchronous: str
) -> tuple[Runtime, NodeService, list[rsa.RSAPrivateKey]]:
    store = SqliteStore(directory / "events.db", synchronous=synchronous)
    await store.open()
    runtime = Runtime(store)
    await runtime.start()
    config = AuthConfig(max_outstanding_challenges=1000, max_sessions=1000)
    tokens = TokenService(config, str(directory))
    await tokens.start(runtime)
    service = NodeService(config, tokens)
    service.start(runtime)
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(8)]
    pems = [
        k.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
        for k in keys
    ]
    sem = asyncio.Semaphore(256)

    async def register(i: int) -> None:
        async with sem:
            await service.register(
                node_id=f"node-{i}", name=f"n{i}", type="bench", public_key=pems[i % len(pems)]
            )

    await asyncio.gather(*(register(i) for i in range(nodes)))
    return runtime, service, keys


async def logins(
    service: NodeService, keys: list[rsa.RSAPrivateKey], count: int, conc: int
) -> tuple[float, list[TokenPair]]:
    """Timed challenge issue + verify; returns (logins/s, token pairs)."""
    nodes = len(service.runtime.nodes.nodes)
    issue_time = 0.0
    signed = []
    for i in range(count):
        node_id = f"node-{i % nodes}"
        t0 = time.perf_counter()
        challenge, _ = service.issue_challenge(node_id)
        issue_time += time.perf_counter() - t0
        signature = keys[(i % nodes) % len(keys)].sign(challenge.encode(), _PSS, hashes.SHA256())
        signed.append((node_id, challenge, signature.hex()))
    sem = asyncio.Semaphore(conc)

    async def one(args: tuple[str, str, str]) -> TokenPair:
        async with sem:
            return await service.login(*args)

    t0 = time.perf_counter()
    pairs = await asyncio.gather(*(one(s) for s in signed))
    elapsed = time.perf_counter() - t0 + issue_time
    return count / elapsed, pairs


def verifications(tokens: TokenService, access: list[str], count: int) -> tuple[float, float]:
    """(cached verifications/s, first-sight verifications/s)."""
    now = time.time()
    for token in access:  # warm the cache
        tokens.verify_access(token, now)
    n = len(access)
    t0 = time.perf_counter()
    for i in range(count):
        tokens.verify_access(access[i % n], now)
    cached = count / (time.perf_counter() - t0)
    cold_count = min(count, 20 * n)
    t0 = time.perf_counter()
    for i in range(cold_count):
        tokens._cache.clear()
        tokens.verify_access(access[i % n], now)
    cold = cold_count / (time.perf_counter() - t0)
    return cached, cold


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        runtime, service, keys = await setup(Path(d), args.tokens, args.synchronous)
        rate, pairs = await logins(service, keys, args.logins, args.concurrency)
        access = [p.access_token for p in pairs[: args.tokens]]
        cached, cold = verifications(service.tokens, access, args.verifications)
        print(
            f"token verification: {cached:,.0f}/s cached, {cold:,.0f}/s first sight "
            f"(EdDSA JWT + claims; {len(access):,} node tokens, liveness checked every call)"
        )
        print(
            f"node login: {rate:,.0f} challenge->verify logins/s server side "
            f"({args.logins:,} logins, {args.concurrency} in flight, RSA-2048 PSS, "
            f"durable append, SQLite synchronous={args.synchronous})"
        )
        await runtime.stop()
        await runtime.store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--verifications", type=int, default=200_000)
    parser.add_argument("--logins", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--synchronous", default="FULL")
    args = parser.parse_args()
    print(f"# {machine()}")
    run(main_async(args))


if __name__ == "__main__":
    main()
