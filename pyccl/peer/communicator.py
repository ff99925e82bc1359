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
3. the peer reports ``done``/``failed`` and waits for the verdict: ``op_ok``
   commits the result into the caller's buffer; a ``drain`` of the op's
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
from pyccl.peer import state as S
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
    pair_call,
)
from pyccl.peer.reconnect import Backoff, combined_hash, dial_any
from pyccl.peer.shared_state import STRATEGIES, SharedState, SyncInfo, content_hash, fetch_planned
from pyccl.types import ReduceOp

log = logging.getLogger("pyccl.comm")

__all__ = ["Communicator", "ReduceInfo", "AsyncHandle"]


class Communicator(Failover):
    """A peer of a pyccl group.

    Args:
        master: ``"host:port"`` of the master, or several,
            ``"host1:port1,host2:port2"``, in order of preference (a standby
            started with ``pyccl master --standby-of``).
        peer_group: peers with the same group number reduce together.
        connections: TCP connections per ring neighbour; every collective is
            striped over all of them.
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
        connections: int = 4,
        name: str = "",
        data_port: int = 0,
        advertise: tuple[str, int] | None = None,
        order: int | None = None,
        secret: str | bytes | None = None,
        tls_ca: str | None = None,
        master_timeout: float | None = None,
    ) -> None:
        if not 1 <= connections <= 64:
            raise ValueError(f"connections must be between 1 and 64, got {connections}")
        if not 0 <= peer_group < 2**31:
            raise ValueError(f"peer_group must be in [0, 2**31), got {peer_group}")
        self.master_address = master
        self.peer_group = peer_group
        self.connections = connections
        self.name = name
        self.data_port = data_port
        self.advertise = advertise
        self.order = order
        self._secret = resolve_secret(secret)
        self._init_failover(master, master_timeout, tls_ca)
        self._dp: Any = None
        self._cv = threading.Condition()
        self._state = S.PeerState()  # guarded by _cv
        self._connected = False
        self._sync_frames: dict[type, P.MasterFrame] = {}  # latest SyncPlan / SyncResult
        self._in_sync = False
        self._scratch = ScratchPool()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._listeners: list[Callable[[], None]] = []
        self._epoch_key: tuple[int, bytes] = (0, b"")  # the current epoch's membership key

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
        """The current epoch's membership key in a run with a secret (empty
        otherwise): what this peer proves membership with on data ports, and
        the torch backend on its side channel."""
        return self._epoch_key[1]

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
        the membership changed (joiners were admitted).

        The round a call votes in is named by this peer's program position
        (see :class:`~pyccl.peer.state.PeerState`), so members at the same
        point of the same program vote in the same round, and a joiner lines
        up whether its loop starts with update_topology() or a collective.
        """
        self._check_connected()
        with self._cv:
            self._cv.wait_for(lambda: self._state.quiet() and self._state.can_vote())
            k = self._state.vote()
            session = self._state.session
        log.debug("peer %d votes round %d", self.peer_id, k)
        self._send(P.Vote(k), session)
        with self._cv:
            self._cv.wait_for(lambda: self._state.round_known(k))
            return self._state.take_round_result(k)

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
                    # A new epoch (a joiner elsewhere admitted) or a short
                    # pause before the next vote, whichever comes first.
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
        """Give a validated call its place in the sequence (program order)."""
        self._check_connected()
        with self._cv:
            self._cv.wait_for(self._state.can_begin)
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
            check_for_epoch(call, n)
            bufs = WorkBuffers(call, self._scratch)
            kind, message, tx, rx = self._dp.collective(
                call.kind, call.root, op.epoch.number, op.tag, op.seq, call.src.ptr, bufs.ptr, bufs.count,
                call.src.dtype_code, int(call.rop))
            result = LOCAL_RESULTS[kind]
            if n > 1:
                self._report(op, result, message)
                with self._cv:
                    self._cv.wait_for(lambda: self._state.verdict_known(op))
                    self._state.verdict(op, result, message, call.name)
            elif result is not S.LocalResult.OK:
                with self._cv:
                    raise self._state.failure_for(op.epoch.number, local=(result, message), what=call.name)
            bufs.commit(op.epoch.rank)
            return ReduceInfo(n, tx, rx, time.perf_counter() - t0, op.epoch.number, op.epoch.peer_ids)
        finally:
            if bufs is not None:
                bufs.release()
            self._finish_op()

    def _report(self, op: S.OpTicket, result: S.LocalResult, message: str) -> None:
        with self._cv:
            frame = self._state.report(op, result, message)
        if frame is None:
            return
        try:
            self._send(frame, op.session)
        except CCLError:
            pass  # the lost-connection path wakes the waiter

    # ----------------------------------------------------------- shared state

    def sync_shared_state(self, state: SharedState, strategy: str = "enforce_popular") -> SyncInfo:
        """Make this peer's copy of ``state`` identical to the group's popular copy.

        A collective: every member calls it at the same point. Each member
        reports its revision and per-key hashes; the master picks the content
        held by the most peers at the highest revision; members that are
        behind or differ fetch exactly the keys that differ, from every
        holder at once, and verify each by hash before this returns. On
        success ``state.revision`` is the group's revision. If the transfer
        cannot complete (every holder failed) this raises ``CCLError`` and
        the revision is left unchanged.

        Strategies: ``enforce_popular`` (default: send and receive),
        ``receive_only`` (never counted as a holder), ``send_only`` (never
        overwritten).
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        if not isinstance(state, SharedState):
            raise ValueError("sync_shared_state takes a pyccl.SharedState")
        self._check_connected()
        t0 = time.perf_counter()
        keys = state.describe()
        hashes = [content_hash(k.buffer) for k in keys]
        with self._cv:
            err = self._state.usable_error()
            if err is not None:
                raise err
            if self._in_sync:
                raise CCLError("sync_shared_state is already running on this Communicator")
            self._cv.wait_for(lambda: self._state.quiet() and self._state.can_vote())
            err = self._state.usable_error()
            if err is not None:
                raise err
            self._in_sync = True
            self._sync_frames.clear()
            session = self._state.sync_begin()
        result: P.MasterFrame | None = None
        try:
            # Publish before asking: a fetcher may call the moment the plan is out.
            self._dp.state_publish([(k.buffer.ptr, k.nbytes, h) for k, h in zip(keys, hashes)])
            self._send(P.Sync(state.revision, strategy, tuple(
                P.StateKey(k.name, k.dtype, k.shape, k.nbytes, h) for k, h in zip(keys, hashes))), session)
            first = self._await_sync_frame((P.SyncPlan, P.SyncResult))
            if isinstance(first, P.SyncResult):
                raise CCLError(f"shared-state sync refused: {first.reason or '?'}")
            assert isinstance(first, P.SyncPlan)
            # A holder silent for a heartbeat timeout is given up (the timeout
            # restarts with every byte, so a slow but live holder is kept).
            ok, reason, rx = fetch_planned(first, keys, self.peer_id, timeout=self._control.heartbeat_timeout,
                                           credential=self._epoch_key)
            with self._cv:
                self._state.sync_fetched(first.sync, ok)
            self._send(P.SyncDone(first.sync, ok, P.clip_reason(reason)), session)
            result = self._await_sync_frame((P.SyncResult,))
            for index, h in first.fetch:
                hashes[index] = h
        finally:
            tx = self._dp.state_unpublish()
            with self._cv:
                self._in_sync = False
                if isinstance(result, P.SyncResult):
                    self._state.sync_result(result, combined_hash(hashes))
                self._state.sync_end()
        assert isinstance(result, P.SyncResult)
        if not result.ok:
            raise CCLError(f"shared-state sync failed: {result.reason or reason}")
        state.revision = result.revision
        return SyncInfo(state.revision, int(tx), int(rx), time.perf_counter() - t0)

    def _await_sync_frame(self, types: tuple[type, ...]) -> P.MasterFrame:
        with self._cv:
            self._cv.wait_for(lambda: any(t in self._sync_frames for t in types) or self._state.stopped()
                              or self._state.sync_cut_off())
            for t in types:
                if t in self._sync_frames:
                    return self._sync_frames.pop(t)
            if self._state.sync_cut_off():
                raise self._state.sync_failure()
            err = self._state.usable_error()
            raise err if err is not None else CCLError("the shared-state sync was interrupted")

    # ------------------------------------------------- control-thread events

    def _on_frame(self, frame: P.MasterFrame) -> None:
        if isinstance(frame, P.OpOk):  # the hot path first
            with self._cv:
                self._state.on_op_ok(frame)
                self._cv.notify_all()
        elif isinstance(frame, P.Epoch):
            self._on_epoch(frame)
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
                                   a.prev_peer_id, key, a.keep_previous_key)
            elif isinstance(a, S.AbortDataPlane):
                if self._dp is not None:
                    self._dp.abort_through(a.through, a.reason)
            else:
                self._control.send(a.frame)
