"""Child process for the compaction crash test: compacts the log given (one chunk per
transaction), printing `progress N` as it goes and `acked SEQ` for each heartbeat it appends
meanwhile, until killed."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from broker.config import Config, LogConfig, RetentionConfig, ServerConfig
from broker.upkeep.compaction import offline
from eventstore.base import StoreConfig
from eventstore.events import NodeHeartbeat

_out = threading.Lock()  # progress comes from the scanning thread too


def say(line: str) -> None:
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


async def main(data: str) -> None:
    config = Config(
        server=ServerConfig(data_dir=data),
        store=StoreConfig(path=f"{data}/events.db"),
        log=LogConfig(level="error"),
        retention=RetentionConfig(batch_chunks=1),
    )
    async with offline(config) as compactor:
        store = compactor.runtime.store

        async def appends() -> None:
            while True:
                [env] = await store.append([NodeHeartbeat(node_id="live")])
                say(f"acked {env.seq}")

        def progress(done: int, total: int) -> None:
            say(f"progress {done}")

        task = asyncio.create_task(appends())
        compactor.clock = lambda: time.time() + 30 * 86400
        await compactor.compact(progress=progress)
        say("done")
        task.cancel()
    await asyncio.sleep(3600)  # the parent kills us


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
