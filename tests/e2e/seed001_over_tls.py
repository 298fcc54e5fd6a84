"""`python -m tests.e2e.seed001_over_tls BASE_URL`: the seed 001 client, unchanged, against a
server over HTTPS (register, challenge/response login, discovery, health), trusting the test CA
the way a node trusts its system's store (SSL_CERT_FILE, set by the test). Prints a JSON summary."""

from __future__ import annotations

import asyncio
import json
import sys

from tests.e2e import seed001_client as seed
from tests.e2e.test_seed001_identity import NODE_001


async def main(base_url: str) -> None:
    seed.private_key_pem, seed.public_key_pem = seed.generate_rsa_keypair()
    async with seed.OpenRedClient(base_url) as client:
        registered = await seed.register_node(client, NODE_001)
        tokens = await seed.authenticate_node(client, NODE_001["node_id"])
        nodes = await seed.discover_nodes(client, {})
        health = await seed.check_health(client)
    summary = {
        "registered": registered["node_id"],
        "token_type": tokens["token_type"],
        "nodes": [n["node_id"] for n in nodes],
        "health": health["status"],
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
