"""Random identifiers without a system call each."""

from __future__ import annotations

import os


class RandomHex:
    """Random hex strings of `nbytes` bytes, cut from one os.urandom call per 4,096 of them: the
    randomness of secrets.token_hex without a system call per message (the server never forks)."""

    def __init__(self, nbytes: int, per_call: int = 4096) -> None:
        self._width = 2 * nbytes
        self._refill = nbytes * per_call
        self._buf = ""
        self._pos = 0

    def __call__(self) -> str:
        pos, width = self._pos, self._width
        if pos + width > len(self._buf):
            self._buf, pos = os.urandom(self._refill).hex(), 0
        self._pos = pos + width
        return self._buf[pos : pos + width]


random_hex8 = RandomHex(8)  # request ids
random_hex6 = RandomHex(6)  # message ids (after their time)
