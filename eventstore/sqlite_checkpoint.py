"""The verified checkpoint of a SQLite log (`<log>.verified`): how far a verify got.

Written after each successful verify pass (`broker verify`, `broker serve`'s background
verification: broker/upkeep/verification.py), read by the next one and by the store's own check
at start-up: the seq and chain hash the pass reached, and the newest compaction whose gaps it
checked (`eventstore.sqlite_verify.verify_log`). Valid only while the log still holds that event
with that hash.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

from eventstore.sqlite_verify import hash_at_file


class Checkpoint(msgspec.Struct):
    seq: int
    hash: str  # hex
    at: float
    compactions: int = 0  # the newest compaction whose gaps were checked (older files: 0)


def checkpoint_path(log_path: str | os.PathLike[str]) -> Path:
    p = Path(log_path)
    return p.with_name(p.name + ".verified")


def read_checkpoint(log_path: str | os.PathLike[str]) -> Checkpoint | None:
    """The verified checkpoint, if the log still holds its event with its hash (blocking)."""
    try:
        cp = msgspec.json.decode(checkpoint_path(log_path).read_bytes(), type=Checkpoint)
        want = bytes.fromhex(cp.hash)
    except (OSError, msgspec.DecodeError, ValueError):
        return None
    return cp if hash_at_file(log_path, cp.seq) == want else None


def write_checkpoint(log_path: str | os.PathLike[str], seq: int, compactions: int = 0) -> None:
    """Record that the log is verified up to `seq` (blocking; atomic: written, then renamed)."""
    h = hash_at_file(log_path, seq)
    if h is None:
        return
    path = checkpoint_path(log_path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # `broker verify` and a server's pass
    tmp.write_bytes(msgspec.json.encode(Checkpoint(seq, h.hex(), time.time(), compactions)))
    os.replace(tmp, path)
