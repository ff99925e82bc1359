"""The master's writes: the state machine's actions carried out on transports.

One event can produce thousands of writes: an epoch frame for every member
of a 10,000-peer group, an ``op_ok`` for each, a heartbeat to every peer.
Written in one go, such a fan-out holds the (single-threaded) loop for tens
of milliseconds, and every other group's verdicts wait behind it. So a batch
is written a slice at a time (at most :data:`SLICE_WRITES` writes or
:data:`SLICE_BYTES` bytes per loop iteration); the rest waits in a queue,
and the loop reads other connections in between. The order that matters is
kept: a connection with writes in the queue queues every later one behind
them, so no frame ever overtakes an earlier frame to the same peer (a
``drain`` stays before its ``epoch``, an ``error`` before its close).
Connections with nothing queued (another group's) are written at once.

Each distinct frame object of a batch is encoded once (the state machine
reuses one object for a fan-out).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pyccl.master.model import Action, Send
from pyccl.master.verdicts import Verdict
from pyccl.wire import FrameError, encode

__all__ = ["MAX_WRITE_BUFFER", "SLICE_WRITES", "SLICE_BYTES", "Writer"]

log = logging.getLogger("pyccl.master")

# A peer whose unsent control bytes pile up past this is not reading its
# connection; it is treated as dead rather than buffered without bound.
MAX_WRITE_BUFFER = 8 << 20
SLICE_WRITES = 256
SLICE_BYTES = 1 << 20

Item = tuple[int, "bytes | None"]  # (connection, frame bytes; None: close it)


class Writer:
    """Writes to ``transports`` (conn id -> transport, owned by the caller);
    ``overflow`` is told the connections whose unsent bytes passed the limit."""

    def __init__(self, loop: asyncio.AbstractEventLoop, transports: dict[int, Any],
                 overflow: Callable[[list[int]], None]) -> None:
        self._loop = loop
        self._transports = transports
        self._overflow = overflow
        self._queue: deque[Item] = deque()
        self._queued: dict[int, int] = {}  # conn id -> its items in the queue
        self._scheduled = False
        self._fan_ids: tuple[int, ...] | None = None  # the last verdict's connections, and their transports
        self._fan: list[Any] = []

    def apply(self, actions: Iterable[Action]) -> None:
        """Carry out actions: in order per connection, large batches a slice per loop iteration."""
        self.put(self._encode(actions))

    def broadcast(self, conn_ids: Sequence[int], data: bytes) -> None:
        """The same bytes to many connections (heartbeats)."""
        self.put([(c, data) for c in conn_ids])

    def fan_out(self, verdict: Verdict) -> None:
        """A verdict's ``op_ok`` to every member: the hot path. The transports
        of the last fan-out are reused while its connection tuple (one per
        epoch) is the same; a closed one is skipped."""
        data = encode(verdict.frame.to_wire())
        ids = verdict.conn_ids
        if self._queue or len(ids) > SLICE_WRITES:
            self.put([(c, data) for c in ids])
            return
        if ids is not self._fan_ids:
            get = self._transports.get
            self._fan = [get(c) for c in ids]
            self._fan_ids = ids
        overflow: list[int] = []
        for conn_id, t in zip(ids, self._fan):
            if t is None or t.is_closing():
                continue
            t.write(data)
            if t.get_write_buffer_size() > MAX_WRITE_BUFFER:
                overflow.append(conn_id)
        if overflow:
            self._overflow(overflow)

    def put(self, items: list[Item]) -> None:
        queued = self._queued
        if not self._queue and len(items) <= SLICE_WRITES:
            self._write(items)
            return
        now: list[Item] = []
        size = 0
        queue = self._queue
        for item in items:
            conn_id, data = item
            if conn_id in queued or len(now) >= SLICE_WRITES or size > SLICE_BYTES:
                queue.append(item)
                queued[conn_id] = queued.get(conn_id, 0) + 1
            else:
                now.append(item)
                size += len(data) if data is not None else 0
        self._write(now)
        self._schedule()

    def _schedule(self) -> None:
        if self._queue and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """One slice of the queue (then the loop reads, and comes back)."""
        self._scheduled = False
        queue, queued = self._queue, self._queued
        items: list[Item] = []
        size = 0
        while queue and len(items) < SLICE_WRITES and size <= SLICE_BYTES:
            item = queue.popleft()
            n = queued[item[0]] - 1
            if n:
                queued[item[0]] = n
            else:
                del queued[item[0]]
            items.append(item)
            size += len(item[1]) if item[1] is not None else 0
        self._write(items)
        self._schedule()

    def _write(self, items: list[Item]) -> None:
        transports = self._transports
        overflow: list[int] = []
        for conn_id, data in items:
            t = transports.get(conn_id)
            if t is None or t.is_closing():
                continue
            if data is None:
                t.close()  # flushes the error frame sent just before, then closes
                continue
            t.write(data)
            if t.get_write_buffer_size() > MAX_WRITE_BUFFER:
                overflow.append(conn_id)
        if overflow:
            self._overflow(overflow)

    def clear(self) -> None:
        """Shutting down: queued writes are dropped (every connection is closing)."""
        self._queue.clear()
        self._queued.clear()

    @staticmethod
    def _encode(actions: Iterable[Action]) -> list[Item]:
        items: list[Item] = []
        last_frame: Any = None
        unsendable: Any = None
        data = b""
        for action in actions:
            if type(action) is Send:
                frame = action.frame
                if frame is unsendable:
                    continue
                if frame is not last_frame:
                    try:
                        data = encode(frame.to_wire())
                    except FrameError:  # over the frame limit (a ring of thousands of long hostnames)
                        log.error("cannot send a %r frame: larger than the frame limit", frame.TYPE)
                        unsendable = frame
                        continue
                    last_frame = frame
                items.append((action.conn_id, data))
            else:
                items.append((action.conn_id, None))
        return items
