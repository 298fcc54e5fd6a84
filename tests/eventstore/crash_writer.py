"""Child process for the crash test: appends forever, printing `seq text` once each is durable."""

from __future__ import annotations

import asyncio
import sys

from eventstore.events import LogNote
from eventstore.sqlite import SqliteStore


async def main(path: str, round_no: int) -> None:
    store = SqliteStore(path)
    await store.open()
    counter = 0

    async def appender(worker: int) -> None:
        nonlocal counter
        while True:
            counter += 1
            text = f"r{round_no}-w{worker}-{counter}"
            batch = [LogNote(stream_id=f"w{worker}", text=text)]
            if counter % 7 == 0:
                batch.append(LogNote(stream_id=f"w{worker}", text=text + "-b"))
            envs = await store.append(batch)
            sys.stdout.write("".join(f"{e.seq} {e.event.text}\n" for e in envs))  # type: ignore[attr-defined]
            sys.stdout.flush()

    await asyncio.gather(*(appender(w) for w in range(16)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
