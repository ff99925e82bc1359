"""The Communicator's failover half (see :mod:`pyccl.peer.reconnect`).

Losing the master is survivable: the peer keeps its epoch, its ops and its
shared state, re-registers with a restarted or standby master (the usual
authenticated handshake, the hello carrying what it holds), and the group
re-forms at a new epoch (docs/architecture.md, "Master failover"). This
mixin holds the master connection's life across such losses; the
Communicator (:mod:`pyccl.peer.communicator`) mixes it in.
"""

from __future__ import annotations

import os
import threading
from functools import partial
from typing import Any

from pyccl import _core
from pyccl import protocol as P
from pyccl.auth import new_nonce
from pyccl.errors import CCLError, GroupLost, LostCause
from pyccl.peer import state as S
from pyccl.peer.control import ControlClient
from pyccl.peer.reconnect import DEFAULT_MASTER_TIMEOUT, ENV_MASTER_TIMEOUT, Backoff, Reconnector, parse_masters
from pyccl.peer.transport import host_id

__all__ = ["Failover"]


class Failover:
    """Master connection, re-registration and give-up, for the Communicator."""

    # Provided by the Communicator.
    _cv: threading.Condition
    _state: S.PeerState
    _dp: Any
    _secret: bytes | None
    peer_group: int
    name: str
    order: int | None
    data_port: int
    connections: int
    advertise: tuple[str, int] | None
    data_host: str | None
    transport: str
    region: str | None

    def _on_frame(self, frame: P.MasterFrame) -> None: ...
    def _on_lost(self, cause: LostCause, reason: str) -> None: ...
    def _carry_out(self, actions: list[S.Action]) -> None: ...
    def _notify_listeners(self) -> None: ...

    def _init_failover(self, master: str, master_timeout: float | None, tls_ca: str | None) -> None:
        self._masters = parse_masters(master)
        if master_timeout is None:
            master_timeout = float(os.environ.get(ENV_MASTER_TIMEOUT) or DEFAULT_MASTER_TIMEOUT)
        if not master_timeout >= 0:
            raise ValueError(f"master_timeout must be >= 0, got {master_timeout}")
        self.master_timeout = master_timeout
        self._tls_ca = tls_ca if tls_ca is not None else os.environ.get("PYCCL_TLS_CA") or None
        self._control = ControlClient(self._masters[0], self._tls_ca)  # the current master connection
        self._hello_addr: tuple[str, int] | None = None  # the data port as announced in every hello
        self._reconnect = Reconnector(Backoff(self._masters), master_timeout, self._dial, self._back,
                                      self._give_up, self._refused, per_try=10.0)

    def _send(self, frame: P.PeerFrame, session: int | None = None) -> None:
        """Send to the current master; a frame of an earlier master connection is dropped."""
        with self._cv:
            if session is not None and session != self._state.session:
                return
            client = self._control
        try:
            client.send(frame)
        except CCLError:
            if self.master_timeout <= 0:
                raise
            # The reader sees the loss too; the group re-forms with a new master.

    def _dial(self, address: str, timeout: float) -> tuple[ControlClient, P.Welcome]:
        """Connect to one master and register (a member re-registers with what it holds)."""
        client = ControlClient(address, self._tls_ca)
        try:
            local_ip = client.open(timeout)
            if self._dp is None:
                self._dp = _core.DataPlane(self.data_host or local_ip, self.data_port, self.connections)
                if self.data_host:
                    self._dp.set_source_host(self.data_host)
            if self._hello_addr is None:
                self._hello_addr = self.advertise or (self.data_host or local_ip, self._dp.port)
            with self._cv:
                # op_ok keys a caller took from the lost connection's channel but has not
                # recorded yet: they commit, so the new master must hear so.
                lost = self._control.channel
                resume = self._state.resume(lost.unrecorded() if lost is not None else ())
            hello = P.Hello(self.peer_group, self._hello_addr[0], self._hello_addr[1], self.name[:P.MAX_NAME_LEN],
                            beat=True, order=self.order, nonce=new_nonce(),
                            host_id=host_id() if self.transport == "auto" else "", region=self.region, resume=resume)
            welcome = client.handshake(hello, timeout, self._secret)
            with self._cv:
                if not self._state.accepts_term(welcome.term):
                    raise CCLError(f"the master at {address} has term {welcome.term}, older than the "
                                   f"{self._state.term} this peer followed: it was replaced")
            return client, welcome
        except BaseException:
            client.close(say_bye=False)
            raise

    def _back(self, client: ControlClient, welcome: P.Welcome, waited: float) -> bool:
        with self._cv:
            if self._state.stopped():
                client.close(say_bye=False)
                return False
            old, self._control = self._control, client
            self._state.welcome(welcome)
            self._state.term = max(self._state.term, welcome.term)
        client.start(self._on_frame, partial(self._on_lost_from, client))
        with self._cv:
            self._cv.notify_all()  # callers between connections wait on the new one's channel now
        old.close(say_bye=False)
        return True

    def _on_lost_from(self, client: ControlClient, cause: LostCause, reason: str) -> None:
        with self._cv:
            if client is not self._control:
                return  # an earlier master connection's reader, ending
            recover = (cause is LostCause.MASTER_UNREACHABLE and self.master_timeout > 0
                       and not self._state.stopped())
            if recover:
                self._state.on_master_lost()
                self._cv.notify_all()
        if not recover:
            self._on_lost(cause, reason)
            return
        self._notify_listeners()
        self._reconnect.start(reason)

    def _give_up(self, reason: str, seconds: float) -> None:
        with self._cv:
            actions = self._state.give_up(reason, seconds)
            self._cv.notify_all()
        self._carry_out(actions)
        self._notify_listeners()

    def _refused(self, exc: GroupLost) -> None:
        self._on_lost(exc.cause, exc.reason)
