"""Communicator: the public peer API.

A Communicator ties together the master connection
(:class:`~pyccl.peer.control.ControlClient`), the C++ data plane
(``pyccl._core.DataPlane``) and the peer's protocol state
(:class:`~pyccl.peer.state.PeerState`, pure). This module holds the threads
and the waiting; the protocol's decisions are the state's:

1. ``begin_op`` gives a call its ``(epoch, tag, seq)`` in program order
   (blocking while the master drains an epoch; an op owed to a fence fails
   at once);
2. the data plane runs the ring into a work buffer (never the caller's
   input, :class:`~pyccl.peer.ops.WorkBuffers`);
3. the peer reports ``done``/``failed`` and waits for the verdict
   (:mod:`~pyccl.peer.verdict`; on plain TCP in the C++ core, woken by the
   ``op_ok`` itself): ``op_ok`` commits the result into the caller's buffer; a ``drain`` of the op's
   epoch raises ``PeerFailure`` once the next epoch is known, so
   ``world_size`` is already the new one and the input is untouched.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from pyccl import _core
from pyccl import protocol as P
from pyccl.auth import epoch_key, resolve_secret
from pyccl.errors import CCLError, LostCause, Timeout
from pyccl.peer import hierarchy, probing
from pyccl.peer import state as S
from pyccl.peer.control import ControlClient
from pyccl.peer.failover import Failover
from pyccl.peer.ops import (
    LOCAL_RESULTS,
    AsyncHandle,
    Call,
    ReduceInfo,
    ScratchPool,
    Ticket,
    WorkBuffers,
    all_reduce_call,
    check_for_epoch,
    launch,
    pair_call,
)
from pyccl.peer.reconnect import Backoff, dial_any
from pyccl.peer.state_sync import SharedStateSync
from pyccl.peer.transport import resolve_transport
from pyccl.peer.verdict import report_and_wait
from pyccl.types import ReduceOp

log = logging.getLogger("pyccl.comm")

__all__ = ["Communicator", "ReduceInfo", "AsyncHandle"]


class Communicator(Failover, SharedStateSync):
    """A peer of a pyccl group.

    Args:
        master: ``"host:port"`` of the master, or several,
            ``"host1:port1,host2:port2"``, in order of preference (a standby
            started with ``pyccl master --standby-of``).
        peer_group: peers with the same group number reduce together.
        connections: TCP connections per ring neighbour (1..64); every
            collective is striped over all of them. ``"auto"``: 4 until
            ``optimize_topology()`` measured the links, then per successor
            the fewest that carry 90% of what 16 do.
        name: free-form label shown in the master's logs.
        data_port: port of this peer's data listener (0: any free port).
        advertise: ``(host, port)`` the other peers should connect to instead
            of the listener's own address, for NAT port forwards or a proxy
            in front of the peer (``pyccl stress`` puts its fault-injecting
            proxy there).
        order: ring-order key: members that give one stand in the ring sorted
            by it (so a fixed group can make ring rank == its own rank);
            members without one follow in admission order.
        secret: the run secret (default: ``PYCCL_SECRET`` from the
            environment). With one, ``connect()`` proves to the master that
            this peer holds it, and requires the master to prove the same;
            a mismatch raises :class:`~pyccl.AuthenticationError` at once.
        tls_ca: CA bundle (PEM) to verify a master that serves its control
            port over TLS (default: ``PYCCL_TLS_CA``; neither: plain TCP).
        transport: ``"auto"`` (default: ``PYCCL_TRANSPORT``, else auto):
            ring neighbours on the same host exchange bytes through shared
            memory, others over TCP; ``"tcp"``: TCP for every link.
        region: where this peer runs (e.g. ``"eu-west"``, <= 64 characters);
            ``optimize_topology()`` uses it (default: regions are measured).
        data_host: the address the data plane listens on and sends from
            (default: the one that reaches the master; any source).
        two_level: all-reduce in two levels across regions of equal size
            (:mod:`pyccl.peer.hierarchy`): "auto" from 1 MiB, "on", "off".
        auto_optimize: measure and reorder (``optimize_topology()``) at the
            first ``update_topology()`` after each membership change.
        master_timeout: seconds to keep looking for a master after losing
            it (restarted or standby; ops in flight then fail with
            ``PeerFailure``) before every call raises ``pyccl.Timeout``
            (default: ``PYCCL_MASTER_TIMEOUT``, else 600). 0: the group is
            lost at once (``GroupLost``), as for a master that cannot return.

    Thread safety: collectives, ``update_topology`` and
    ``sync_shared_state`` may be called from several threads; each call
    takes its place in the sequence when it is made (program order).
    """

    def __init__(
        self,
        master: str,
        peer_group: int = 0,
        connections: int | str = 4,
        name: str = "",
        data_port: int = 0,
        advertise: tuple[str, int] | None = None,
        order: int | None = None,
        secret: str | bytes | None = None,
        tls_ca: str | None = None,
        transport: str | None = None,
        region: str | None = None,
        data_host: str | None = None,
        two_level: str = "auto",
        auto_optimize: bool = False,
        master_timeout: float | None = None,
    ) -> None:
        self._auto = connections == "auto"
        if self._auto:
            connections = 4
        if not isinstance(connections, int) or not 1 <= connections <= 64:
            raise ValueError(f"connections must be between 1 and 64 or 'auto', got {connections!r}")
        if not 0 <= peer_group < 2**31:
            raise ValueError(f"peer_group must be in [0, 2**31), got {peer_group}")
        self.master_address = master
        self.peer_group = peer_group
        self.connections = connections
        self.name = name
        self.data_port = data_port
        self.advertise = advertise
        self.order = order
        self.transport = resolve_transport(transport)
        self.region, self.two_level = hierarchy.check_options(region, two_level)
        self._auto_optimize, self._optimized_epoch = auto_optimize, 0
        self.data_host = data_host
        self._secret = resolve_secret(secret)
        self._init_failover(master, master_timeout, tls_ca)
        self._dp: Any = None
        self._cv = threading.Condition()
        self._state = S.PeerState()  # guarded by _cv
        self._connected = False
        self._sync_frames: dict[type, P.MasterFrame] = {}  # latest SyncPlan / SyncResult
        self._last_epoch: P.Epoch | None = None  # the ring an epoch_delta from the master applies to
        self._in_sync = False
        self._scratch = ScratchPool()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._listeners: list[Callable[[], None]] = []
        self._epoch_key: tuple[int, bytes] = (0, b"")  # the current epoch's membership key
        self._link_counts: dict[int, int] = {}  # connections="auto": peer id -> connections towards it

    # ---------------------------------------------------------------- state

    @property
    def peer_id(self) -> int:
        """The id the master gave this peer (0 before ``connect``)."""
        return self._control.peer_id

    @property
    def world_size(self) -> int:
        """Members of this peer group in the current epoch (0 before admission)."""
        return self._state.world_size

    @property
    def rank(self) -> int:
        """This peer's position in the current ring (may change between epochs)."""
        e = self._state.epoch
        return e.rank if e else -1

    @property
    def epoch(self) -> int:
        e = self._state.epoch
        return e.number if e else 0

    @property
    def lost(self) -> str | None:
        """Why this peer is no longer part of the group (master gone, expelled), or None."""
        lost = self._state.lost
        return lost.reason if lost is not None else None

    @property
    def membership_key(self) -> bytes:
        """The current epoch's membership key in a run with a secret (else empty): what
        this peer proves membership with on data ports and the torch side channel."""
        return self._epoch_key[1]

    @property
    def link_connections(self) -> int:
        """Connections to the ring successor in this epoch (``connections="auto"`` tunes it)."""
        return int(self._dp.link_connections()) if self._dp is not None else 0

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._state.closed

    @property
    def peers(self) -> tuple[int, ...]:
        """Peer ids of the current members in ring order."""
        e = self._state.epoch
        return e.peer_ids if e else ()

    # ------------------------------------------------------------ lifecycle

    def connect(self, timeout: float = 30.0) -> Communicator:
        """Join the group; returns once the master has admitted this peer.

        The first peer of a group is admitted at once; later ones at the
        members' next ``update_topology()``. The masters of the list are
        tried in order, again and again (with backoff), until one answers or
        ``timeout`` passes (``Timeout``, naming the last failure); a wrong
        secret raises ``AuthenticationError`` at once.
        """
        if self._connected:
            raise CCLError("connect() was already called on this Communicator")
        if self._state.closed:
            raise CCLError("this Communicator is closed; create a new one")
        deadline = time.monotonic() + timeout
        try:
            stop = threading.Event()
            self._control, welcome = dial_any(Backoff(self._masters), self._dial, deadline, stop,
                                              max(0.1, timeout), auth_fatal=True)
            with self._cv:
                self._state.welcome(welcome)
                self._state.term = welcome.term
            # Data links use the master's liveness settings: keepalives at the
            # heartbeat interval, silence for heartbeat_timeout kills a link.
            self._dp.set_link_timeouts(self._control.heartbeat_interval, self._control.heartbeat_timeout)
            self._reconnect.per_try = self._control.heartbeat_timeout  # a dial to a frozen master ends then
            # A run with a secret: every data connection must prove membership of the epoch.
            self._dp.set_authenticate(self._secret is not None)
            self._connected = True
            self._control.start(self._on_frame, partial(self._on_lost_from, self._control))
            with self._cv:
                ok = self._cv.wait_for(lambda: self._state.epoch is not None or self._state.stopped(),
                                       max(0.0, deadline - time.monotonic()))
                err = self._state.usable_error()
                if err is not None:
                    raise err
                if not ok:
                    raise Timeout(
                        f"not admitted within {timeout:.1f} s: the group's members must call update_topology()",
                        seconds=timeout)
        except BaseException:
            self.close()
            raise
        log.info("peer %d admitted: rank %d of %d", self.peer_id, self.rank, self.world_size)
        return self

    def close(self) -> None:
        """Leave the group and release every thread, socket and port. Idempotent."""
        with self._cv:
            if self._state.closed:
                return
            self._state.close()
            self._cv.notify_all()
        self._reconnect.stop()
        self._control.close(say_bye=self._connected and self._state.lost is None)
        if self._dp is not None:
            self._dp.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._cv:
            self._cv.notify_all()

    def on_membership_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every membership event: an epoch is
        drained, a new epoch starts, or this peer loses its group. It runs on
        the control thread: it must be quick and must not wait for the
        master (read ``epoch``, ``peers``, ``lost``; fail pending work)."""
        self._listeners.append(listener)

    def _notify_listeners(self) -> None:
        for fn in self._listeners:
            try:
                fn()
            except Exception:  # a listener's bug must not take the control thread down
                log.exception("a membership listener failed")

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_connected(self) -> None:
        if not self._connected and not self._state.closed:
            raise CCLError("call connect() before using the Communicator")

    # -------------------------------------------------------------- topology

    def update_topology(self) -> bool:
        """Admit waiting peers. Every member calls it; safe on every iteration.

        Waits for this peer's own outstanding async ops first. Returns True if
        the membership changed. The round it votes in is named by this peer's
        program position (:class:`~pyccl.peer.state.PeerState`), so members at
        one point of one program vote alike, and joiners line up with them.
        With ``auto_optimize`` the first call in each new epoch is an
        ``optimize_topology()``."""
        self._check_connected()
        if self._auto_optimize and self._state.optimize_due(self._optimized_epoch):
            return self.optimize_topology()
        with self._cv:
            self._cv.wait_for(lambda: self._state.quiet() and self._state.can_vote())
            k = self._state.vote()
            session = self._state.session
        log.debug("peer %d votes round %d", self.peer_id, k)
        self._send(P.Vote(k), session)
        with self._cv:
            self._cv.wait_for(lambda: self._state.round_known(k))
            return self._state.take_round_result(k)

    def optimize_topology(self, seconds: float = 0.25, max_bytes: int = 16 << 20, max_targets: int = 16) -> bool:
        """Collective: measure the links to the other members; the master reorders the
        ring at the next epoch. Called like ``update_topology()`` (it also admits
        waiting peers); probes: :mod:`pyccl.peer.probing`, order: :mod:`pyccl.ringopt`.
        Returns True if the ring or the membership changed."""
        self._check_connected()
        with self._cv:
            self._cv.wait_for(self._state.quiet)
            k = self._state.vote()
            view = self._state.epoch
        links: tuple[P.LinkReport, ...] = ()
        relink = False
        if view is not None and view.world_size > 1:
            # With auto connections this updates _link_counts before the vote (the next epoch uses them).
            links, relink = probing.measure(self._dp, view.members, self.peer_id, view.number, self.connections,
                                            seconds, max_bytes, max_targets, self._link_counts if self._auto else None,
                                            self._control.heartbeat_timeout, partial(self._epoch_moved, view.number))
        self._control.send(P.Vote(k, links, relink or None))
        with self._cv:
            self._cv.wait_for(lambda: self._state.round_known(k))
            changed = self._state.take_round_result(k)
        self._optimized_epoch = self.epoch  # planned with these measurements
        return changed

    def wait_for_world(self, n: int, timeout: float) -> int:
        """Call ``update_topology()`` until the group has at least ``n``
        members; returns the world size. Between rounds it sleeps until the
        master announces a new epoch (or a peer waits to join), not on a
        timer. Raises :class:`~pyccl.Timeout` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.world_size < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"the group did not reach {n} members within {timeout:.0f} s "
                              f"({self.world_size} joined)", seconds=timeout)
            epoch = self.epoch
            if not self.update_topology():
                with self._cv:
                    # A new epoch (a joiner admitted) or a short pause, whichever first.
                    self._cv.wait_for(partial(self._epoch_moved, epoch), min(left, 0.05))
        return self.world_size

    def _epoch_moved(self, epoch: int) -> bool:
        return self.epoch != epoch or self._state.stopped()

    # ------------------------------------------------------------ collectives

    def all_reduce(self, x: Any, out: Any = None, op: ReduceOp | str = ReduceOp.SUM, tag: int = 0,
                   quantize: str | None = None) -> ReduceInfo:
        """Reduce ``x`` across the group, in place, or into ``out``.

        On ``PeerFailure`` the input holds exactly what it held before.

        ``quantize="uint8"`` (float32 only) sends uint8 codes with a min/max
        per chunk, about 4x fewer bytes; the result is still bit-identical on
        every peer (each segment's owner quantizes its final value once and
        keeps the decoded copy itself). NaN or Inf in the values raise
        ``MismatchError`` on every peer.
        """
        return self._execute(self._begin(all_reduce_call(x, out, op, tag, quantize), tag))

    def all_reduce_async(self, x: Any, out: Any = None, op: ReduceOp | str = ReduceOp.SUM, tag: int = 0,
                         quantize: str | None = None) -> AsyncHandle:
        """Start an all-reduce and return at once; ops with distinct tags run concurrently.

        The op's place in the sequence is fixed now, in program order; its
        errors surface from ``handle.wait()``.
        """
        return self._submit(lambda: self._begin(all_reduce_call(x, out, op, tag, quantize), tag))

    def reduce_scatter(self, x: Any, out: Any, op: ReduceOp | str = ReduceOp.SUM, tag: int = 0) -> ReduceInfo:
        """Reduce ``x`` (world_size * m elements) across the group; rank r gets
        elements [r*m, (r+1)*m) of the result in ``out`` (m elements).

        A ring reduce-scatter (the first half of the ring all-reduce), not an
        all-reduce in disguise. ``x`` is never written.
        """
        return self._execute(self._begin(pair_call(_core.Collective.REDUCE_SCATTER, x, out, op, tag, 0), tag))

    def reduce_scatter_async(self, x: Any, out: Any, op: ReduceOp | str = ReduceOp.SUM, tag: int = 0) -> AsyncHandle:
        return self._submit(lambda: self._begin(pair_call(_core.Collective.REDUCE_SCATTER, x, out, op, tag, 0), tag))

    def all_gather(self, x: Any, out: Any, tag: int = 0) -> ReduceInfo:
        """Concatenate every rank's ``x`` (m elements) in rank order into ``out``
        (world_size * m elements) on every rank. A ring all-gather."""
        return self._execute(self._begin(pair_call(_core.Collective.ALL_GATHER, x, out, "sum", tag, 0), tag))

    def all_gather_async(self, x: Any, out: Any, tag: int = 0) -> AsyncHandle:
        return self._submit(lambda: self._begin(pair_call(_core.Collective.ALL_GATHER, x, out, "sum", tag, 0), tag))

    def broadcast(self, x: Any, root: int = 0, tag: int = 0) -> ReduceInfo:
        """Overwrite ``x`` on every rank with the bytes of rank ``root``'s ``x``
        (a pipelined ring from the root). Only the root's buffer is an input."""
        return self._execute(self._begin(pair_call(_core.Collective.BROADCAST, x, None, "sum", tag, root), tag))

    def broadcast_async(self, x: Any, root: int = 0, tag: int = 0) -> AsyncHandle:
        return self._submit(lambda: self._begin(pair_call(_core.Collective.BROADCAST, x, None, "sum", tag, root),
                                                tag))

    def _begin(self, call: Call, tag: int) -> Ticket:
        """Give a validated call its place in the sequence (program order).

        Shapes that depend on the world size are checked first, against the
        epoch the op will run in (the lock holds it): a misuse raises
        ValueError without taking a place, so this peer's next call still
        matches the others' instead of leaving them waiting for this one."""
        self._check_connected()
        with self._cv:
            self._cv.wait_for(self._state.can_begin)
            if self._state.epoch is not None and self._state.usable_error() is None:
                check_for_epoch(call, self._state.epoch.world_size)
            return Ticket(call, self._state.begin_op(tag, call.name))

    def _submit(self, begin: Callable[[], Ticket]) -> AsyncHandle:
        try:
            ticket = begin()
        except CCLError as exc:
            fut: concurrent.futures.Future[ReduceInfo] = concurrent.futures.Future()
            fut.set_exception(exc)
            return AsyncHandle(fut)
        with self._cv:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="pyccl-op")
            pool = self._pool
        try:
            return AsyncHandle(pool.submit(self._execute, ticket))
        except RuntimeError as exc:  # pool shut down by close()
            self._finish_op()
            raise CCLError("this Communicator is closed") from exc

    def _finish_op(self) -> None:
        with self._cv:
            self._state.finish_op()
            self._cv.notify_all()

    def _execute(self, t: Ticket) -> ReduceInfo:
        t0 = time.perf_counter()
        call, op = t.call, t.op
        n = op.epoch.world_size
        bufs: WorkBuffers | None = None
        try:
            bufs = WorkBuffers(call, self._scratch)
            kind, message, tx, rx, two = launch(self._dp, call, bufs, op.epoch, op.tag, op.seq, self.two_level)
            result = LOCAL_RESULTS[kind]
            if n > 1:
                report_and_wait(self._cv, self._state, self._current_control, op, result, message, call.name)
            elif result is not S.LocalResult.OK:
                with self._cv:
                    raise self._state.failure_for(op.epoch.number, local=(result, message), what=call.name)
            bufs.commit(op.epoch.rank)
            return ReduceInfo(n, tx, rx, time.perf_counter() - t0, op.epoch.number, op.epoch.peer_ids, two)
        finally:
            if bufs is not None:
                bufs.release()
            self._finish_op()

    def _current_control(self) -> ControlClient:
        return self._control

    # ----------------------------------------------------------- shared state


    # ------------------------------------------------- control-thread events

    def _on_frame(self, frame: P.MasterFrame) -> None:
        if isinstance(frame, P.OpOk):  # the hot path first
            with self._cv:
                self._state.on_op_ok(frame)
                self._cv.notify_all()
        elif isinstance(frame, P.Epoch):
            self._on_epoch(frame)
        elif isinstance(frame, P.EpochDelta):  # the change from the epoch this peer holds (FrameError if not)
            self._on_epoch(frame.expand(self._last_epoch))
        elif isinstance(frame, P.Drain):
            with self._cv:
                actions = self._state.on_drain(frame)
                self._cv.notify_all()
            self._carry_out(actions)
            self._notify_listeners()
        elif isinstance(frame, P.RoundDone):
            with self._cv:
                self._state.on_round_done(frame)
                self._cv.notify_all()
        elif isinstance(frame, (P.SyncPlan, P.SyncResult)):
            with self._cv:
                self._sync_frames[type(frame)] = frame
                self._cv.notify_all()
        else:  # Welcome (a second one), Heartbeat, Error are handled by the control client
            log.warning("ignoring an unexpected %r frame from the master", frame.TYPE)

    def _on_epoch(self, frame: P.Epoch) -> None:
        self._last_epoch = frame
        with self._cv:
            prelude = self._state.recovery_prelude()  # a re-formed group: end the old epoch's ops
            plan = self._state.prepare_epoch(frame)
        # Data plane first: an op that sees the new epoch must find its links.
        self._carry_out([*prelude, plan])
        with self._cv:
            self._state.on_epoch(frame, plan)
            after = self._state.after_epoch()
            self._cv.notify_all()
        self._carry_out(after)
        self._notify_listeners()
        log.info("epoch %d: rank %d of %d (%s)", frame.epoch, plan.rank, plan.world_size, frame.reason)

    def _on_lost(self, cause: LostCause, reason: str) -> None:
        with self._cv:
            actions = self._state.on_lost(cause, reason)
            closed = self._state.closed
            self._cv.notify_all()
        if not closed:
            log.warning("%s", reason)
        self._carry_out(actions)
        self._notify_listeners()

    def _carry_out(self, actions: list[S.Action]) -> None:
        for a in actions:
            if isinstance(a, S.SetDataPlaneEpoch):
                nxt = a.next_member
                key = b""
                if self._secret is not None and a.salt is not None:
                    key = epoch_key(self._secret, self.peer_group, a.epoch, a.salt)
                self._epoch_key = (a.epoch, key)
                self._dp.set_epoch(a.epoch, a.peer_id, a.rank, a.world_size, nxt.peer_id, nxt.host, nxt.port,
                                   a.prev_peer_id, key, keep_previous_key=a.keep_previous_key,
                                   shm=a.next_same_host, connections=self._link_counts.get(nxt.peer_id, 0),
                                   rings=list(a.rings))
            elif isinstance(a, S.AbortDataPlane):
                if self._dp is not None:
                    self._dp.abort_through(a.through, a.reason)
            else:
                self._control.send(a.frame)
