"""The one ISO 8601 formatter of the code base: epoch seconds as `2026-01-01T00:00:00.000Z`.

Here, in the lowest layer, because projections format times too (a message's `sent_at` and
`expires_at`, built once per message for its push frame and its pending view) and the broker's
every view does. The output is `datetime.fromtimestamp(ts, UTC).isoformat(timespec=
"milliseconds")` with a `Z`: the time rounded to the microsecond, then cut to the millisecond.
It is on the hot path (every pushed message formats two), so each whole second is formatted once
while it is in use, and the exact times a commit's events share once.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import overload

# What UTC can render: an instant outside (recorded before dates were checked) is shown at the
# nearest bound, so that a list holding it still renders.
EARLIEST = dt.datetime(1, 1, 1, tzinfo=dt.UTC).timestamp()
LATEST = dt.datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=dt.UTC).timestamp()

_seconds: dict[int, str] = {}  # whole seconds formatted lately (sent_at and expires_at differ)
_recent: dict[float, str] = {}  # exact times formatted lately: a commit's events share one ts
_MILLIS = [f".{ms:03d}Z" for ms in range(1000)]


@overload
def iso(ts: float) -> str: ...
@overload
def iso(ts: None) -> None: ...
@overload
def iso(ts: float | None) -> str | None: ...
def iso(ts: float | None) -> str | None:
    """`ts` (epoch seconds) as ISO 8601 UTC with milliseconds and a Z; None stays None."""
    if ts is None:
        return None
    text = _recent.get(ts)
    if text is None:
        if len(_recent) >= 1024:
            _recent.clear()
        text = _recent[ts] = _format(ts)
    return text


def _format(ts: float) -> str:
    if not 0 <= ts <= LATEST:  # before 1970 (or out of range): the slow, general way
        ts = min(max(ts, EARLIEST), LATEST)
        return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    second = int(ts)
    micros = round((ts - second) * 1e6)  # as datetime.fromtimestamp: half to even
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    text = _seconds.get(second)
    if text is None:
        if len(_seconds) >= 4096:
            _seconds.clear()
        text = _seconds[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return text + _MILLIS[micros // 1000]
