"""Failover, peer side: finding a master again after losing one.

``Communicator("host1:port,host2:port")`` names the masters in order of
preference (a restarted master on the same address, or a standby started
with ``pyccl master --standby-of``). When the master connection closes or
goes silent for a heartbeat timeout, the peer keeps its epoch, its ops and
its shared state, and a :class:`Reconnector` thread dials the masters in
order, with backoff, until one takes its re-registration (the usual
authenticated handshake, the hello carrying :class:`pyccl.protocol.Resume`).
If none does within ``master_timeout`` (default 10 minutes) every call
raises :class:`pyccl.Timeout` saying since when the master is unreachable.

:class:`Backoff` (the order and pacing of attempts) is pure; the dialing
itself is the Communicator's (it builds the hello from the peer's state).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

from pyccl import protocol as P
from pyccl.errors import AuthenticationError, CCLError, GroupLost, Timeout
from pyccl.peer.control import ControlClient, parse_address

__all__ = ["DEFAULT_MASTER_TIMEOUT", "Backoff", "Reconnector", "combined_hash", "dial_any", "parse_masters"]

log = logging.getLogger("pyccl.comm")

DEFAULT_MASTER_TIMEOUT = 600.0  # seconds without a master before calls raise Timeout
ENV_MASTER_TIMEOUT = "PYCCL_MASTER_TIMEOUT"

Dial = Callable[[str, float], tuple[ControlClient, P.Welcome]]


def parse_masters(spec: str) -> tuple[str, ...]:
    """``"host1:port1,host2:port2"`` -> the addresses in order; ValueError names a bad one."""
    addresses = tuple(a.strip() for a in spec.split(","))
    if not addresses or not all(addresses):
        raise ValueError(f"master address list {spec!r} has an empty entry; use 'host1:port1,host2:port2'")
    for a in addresses:
        parse_address(a)
    return addresses


def combined_hash(hashes: Sequence[int]) -> int:
    """One 64-bit hash of a shared state's per-key hashes (reported when re-registering)."""
    raw = b"".join(h.to_bytes(8, "little") for h in hashes)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


class Backoff:
    """Which master to try at each attempt and how long to wait before it.

    Attempts go round the list in order of preference; each new round waits
    longer (``first`` doubling up to ``cap``, with jitter so that a whole
    group does not hammer a restarting master in lockstep). Pure.
    """

    def __init__(self, addresses: Sequence[str], first: float = 0.05, cap: float = 1.0,
                 rng: random.Random | None = None) -> None:
        if not addresses:
            raise ValueError("no master address to try")
        self.addresses = tuple(addresses)
        self.first, self.cap = first, cap
        self._rng = rng or random.Random()

    def address(self, attempt: int) -> str:
        return self.addresses[attempt % len(self.addresses)]

    def delay(self, attempt: int) -> float:
        """Seconds to wait before ``attempt`` (0 within a round)."""
        rounds, within = divmod(attempt, len(self.addresses))
        if rounds == 0 or within:
            return 0.0
        return float(min(self.cap, self.first * 2 ** (rounds - 1)) * self._rng.uniform(0.5, 1.0))


def dial_any(backoff: Backoff, dial: Dial, deadline: float, stop: threading.Event, per_try: float,
             auth_fatal: bool) -> tuple[ControlClient, P.Welcome]:
    """Try the masters until one welcomes this peer, ``deadline`` passes
    (:class:`Timeout`, chained to the last failure) or ``stop`` is set.

    A refused re-registration (:class:`GroupLost`) ends the search; so does an
    :class:`AuthenticationError` if ``auth_fatal`` (a first connect must
    report a wrong secret at once; a reconnecting peer keeps looking, since
    the address may now belong to something else).
    """
    attempt = 0
    last: CCLError | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout(f"no master of {', '.join(backoff.addresses)} answered ({last})", seconds=0.0) from last
        if stop.wait(min(backoff.delay(attempt), left)):
            raise CCLError("the Communicator was closed while looking for a master")
        address = backoff.address(attempt)
        attempt += 1
        try:
            return dial(address, max(0.05, min(per_try, deadline - time.monotonic())))
        except GroupLost:
            raise
        except AuthenticationError as exc:
            if auth_fatal:
                raise
            last = exc
        except CCLError as exc:
            last = exc
        log.debug("master %s: %s", address, last)


class Reconnector:
    """The thread that finds a master again after the connection was lost.

    Args:
        backoff: the masters and the pacing.
        give_up: seconds after the loss before ``on_give_up`` is called.
        dial: connects to one address and re-registers (raises on failure).
        on_back: installs the new connection; returns False if it must not be
            used after all (the peer closed meanwhile), which ends the search.
        on_give_up: ``(reason, seconds)``: no master came back in time.
        on_refused: ``(error)``: a master refused the re-registration.
        per_try: bound of one attempt (connect + handshake).
    """

    def __init__(self, backoff: Backoff, give_up: float, dial: Dial,
                 on_back: Callable[[ControlClient, P.Welcome, float], bool],
                 on_give_up: Callable[[str, float], None], on_refused: Callable[[GroupLost], None],
                 per_try: float) -> None:
        self.backoff = backoff
        self.give_up = give_up
        self._dial = dial
        self._on_back, self._on_give_up, self._on_refused = on_back, on_give_up, on_refused
        self.per_try = per_try
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending: str | None = None  # a loss the running thread has yet to handle

    def start(self, reason: str) -> None:
        """Begin looking for a master (queued if the thread is finishing an earlier search)."""
        with self._lock:
            if self._stop.is_set():
                return
            self._pending = reason
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._loop, name="pyccl-reconnect", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10.0)

    def _loop(self) -> None:
        while True:
            with self._lock:
                reason, self._pending = self._pending, None
                if reason is None or self._stop.is_set():
                    self._thread = None
                    return
            self._run(reason)

    def _run(self, reason: str) -> None:
        lost_at = time.monotonic()
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        where = ",".join(self.backoff.addresses)
        log.warning("%s; looking for a master (%s) for up to %g s", reason, where, self.give_up)
        try:
            client, welcome = dial_any(self.backoff, self._dial, lost_at + self.give_up, self._stop, self.per_try,
                                       auth_fatal=False)
        except GroupLost as exc:
            self._on_refused(exc)
            return
        except CCLError as exc:
            if self._stop.is_set():
                return
            why = (f"the master at {where} has been unreachable since {since} ({self.give_up:g} s; last "
                   f"attempt: {exc.__cause__ or exc})")
            log.error("%s", why)
            self._on_give_up(why, self.give_up)
            return
        waited = time.monotonic() - lost_at
        if self._on_back(client, welcome, waited):
            log.warning("re-registered with the master at %s after %.2f s", client.address, waited)
