"""The timeout watchdog of one process group.

torch gives every process group a timeout (``init_process_group(timeout=)``,
``new_group(timeout=)``) and some calls a timeout of their own
(``dist.barrier(timeout=)``). gloo raises a timeout error naming the op once
it passes. A pyccl op can block in places that take no deadline: a core
collective waiting for a rank that never issues it (on the caller's thread
when a synchronous call runs inline, else on the group's runner), or a
point-to-point receive nobody sends to.

So every op is registered here with its deadline when it is issued, and
unregistered when it completes. One thread per group sleeps until the
earliest deadline (no polling: it is woken only when an op with an earlier
deadline arrives) and hands an op that outlives it to ``on_expiry``, which
fails the group and releases whatever the op blocks on. Cost per op: one
lock and a dict insert and delete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("pyccl.torch")

T = TypeVar("T")


class Watchdog(Generic[T]):
    """Calls ``on_expiry(item, seconds)`` (once, on its own thread) for the
    first watched item whose deadline passes before it is unwatched."""

    def __init__(self, name: str, on_expiry: Callable[[T, float], None]) -> None:
        self._on_expiry = on_expiry
        self._cv = threading.Condition()
        self._items: dict[int, tuple[float, float, T]] = {}  # id -> (deadline, timeout, item)
        self._wake_at = float("inf")  # when the thread will look next
        self._stopped = False
        self._fired = False
        self._thread = threading.Thread(target=self._loop, name=f"pyccl-torch-watchdog-{name}", daemon=True)
        self._thread.start()

    def watch(self, item: T, timeout: float) -> None:
        """Start watching ``item``: it must be unwatched within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cv:
            self._items[id(item)] = (deadline, timeout, item)
            if deadline < self._wake_at:
                self._wake_at = deadline
                self._cv.notify()

    def unwatch(self, item: T) -> None:
        with self._cv:
            self._items.pop(id(item), None)

    def _loop(self) -> None:
        with self._cv:
            while not self._stopped and not self._fired:
                now = time.monotonic()
                expired = [(d, t, it) for d, t, it in self._items.values() if d <= now]
                if expired:
                    _, timeout, item = min(expired, key=lambda e: e[0])
                    self._fired = True  # the group is failed as a whole: once is enough
                    self._cv.release()
                    try:
                        self._on_expiry(item, timeout)
                    except Exception:
                        log.exception("pyccl: handling a timed-out op failed")
                    finally:
                        self._cv.acquire()
                    return
                self._wake_at = min((d for d, _, _ in self._items.values()), default=float("inf"))
                self._cv.wait(None if self._wake_at == float("inf") else self._wake_at - now)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
