"""Communicator: the public peer API.

A Communicator ties together the master connection (:mod:`pyccl.control`),
the C++ data plane (``pyccl._core.DataPlane``) and the peer's side of the
op lifecycle:

1. ``_begin_op`` assigns the op its ``(epoch, tag, seq)`` in program order
   (blocking while the master drains an epoch, and failing ops owed to a
   fence, see docs/architecture.md);
2. the data plane runs the ring into a work buffer (never the caller's input);
3. the peer reports ``done``/``failed`` and waits for the master's verdict:
   ``op_ok`` commits the result into the caller's buffer; a ``drain`` of the
   op's epoch raises ``PeerFailure`` once the next epoch is known, so
   ``world_size`` is already the new one and the input is untouched.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pyccl import _core
from pyccl.control import ControlClient
from pyccl.errors import CCLError, MismatchError, PeerFailure, Timeout
from pyccl.shared_state import STRATEGIES, SharedState, SyncInfo, content_hash, fetch_planned
from pyccl.types import Buffer, ReduceOp, as_buffer

log = logging.getLogger("pyccl.comm")

MAX_TAG = (1 << 31) - 1
_VOTE_BITS = 20
_VOTE_MASK = (1 << _VOTE_BITS) - 1


@dataclass(frozen=True)
class ReduceInfo:
    """What an all-reduce did: who took part and what it cost.

    ``peers`` are the master-assigned ids of the participants in ring order
    and ``epoch`` the membership epoch the op ran in, so a caller can tell
    exactly which inputs were reduced.
    """

    world_size: int
    tx_bytes: int
    rx_bytes: int
    seconds: float
    epoch: int = 0
    peers: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Epoch:
    number: int
    members: tuple[tuple[int, str, int], ...]  # (peer_id, data host, data port) in ring order
    rank: int

    @property
    def world_size(self) -> int:
        return len(self.members)

    @property
    def peer_ids(self) -> tuple[int, ...]:
        return tuple(m[0] for m in self.members)


@dataclass
class _Drain:
    kind: str
    reason: str


@dataclass(frozen=True)
class _Ticket:
    """A collective call with its place in the sequence, ready to run."""

    kind: Any  # _core.Collective
    src: Buffer
    dst: Buffer | None
    rop: ReduceOp
    tag: int
    root: int
    epoch: "_Epoch"
    seq: int

    @property
    def name(self) -> str:
        return _COLLECTIVE_NAMES.get(self.kind, "collective")


_COLLECTIVE_NAMES = {
    _core.Collective.ALL_REDUCE: "all_reduce",
    _core.Collective.ALL_REDUCE_Q8: "all_reduce(quantize='uint8')",
    _core.Collective.REDUCE_SCATTER: "reduce_scatter",
    _core.Collective.ALL_GATHER: "all_gather",
    _core.Collective.BROADCAST: "broadcast",
}


class AsyncHandle:
    """Handle of an ``all_reduce_async``; ``wait()`` returns its ReduceInfo or raises its error."""

    def __init__(self, future: "concurrent.futures.Future[ReduceInfo]") -> None:
        self._future = future

    def wait(self, timeout: float | None = None) -> ReduceInfo:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise Timeout(f"all_reduce_async did not finish within {timeout} s") from None

    def done(self) -> bool:
        return self._future.done()


class _ScratchPool:
    """Reusable work buffers for in-place ops: fresh large allocations cost
    page faults on every call, which is slower than the reduce itself."""

    def __init__(self, keep: int = 4) -> None:
        self._free: dict[int, list[np.ndarray]] = {}
        self._keep = keep
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> np.ndarray:
        with self._lock:
            lst = self._free.get(nbytes)
            if lst:
                return lst.pop()
        return np.empty(max(nbytes, 1), dtype=np.uint8)

    def put(self, buf: np.ndarray) -> None:
        with self._lock:
            lst = self._free.setdefault(buf.nbytes, [])
            if len(lst) < self._keep:
                lst.append(buf)


class Communicator:
    """A peer of a pyccl group. See ../shared/DESIGN.md for the contract.

    Args:
        master: ``"host:port"`` of the master.
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
        self._control = ControlClient(master)
        self._dp: Any = None
        self._cv = threading.Condition()
        self._epoch: _Epoch | None = None
        self._draining: int | None = None        # epoch being drained: new ops wait
        self._drained_through = 0                  # every epoch <= this has ended
        self._drains: dict[int, _Drain] = {}
        self._next_seq: dict[int, int] = {}        # per tag, in the current epoch
        self._fence_debt: dict[int, int] = {}      # per tag: ops to fail at once
        self._decided: set[tuple[int, int, int]] = set()
        self._inflight = 0
        # Program position, which names topology rounds (see update_topology).
        self._ops_begun = 0
        self._votes_since_op = 0
        self._round_results: dict[int, bool] = {}
        self._lost: str | None = None
        self._closed = False
        self._connected = False
        self._sync_frames: dict[str, dict[str, Any]] = {}  # latest sync_plan / sync_result
        self._in_sync = False
        self._scratch = _ScratchPool()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # ---------------------------------------------------------------- state

    @property
    def peer_id(self) -> int:
        """The id the master gave this peer (0 before ``connect``)."""
        return self._control.peer_id

    @property
    def world_size(self) -> int:
        """Members of this peer group in the current epoch (0 before admission)."""
        e = self._epoch
        return e.world_size if e else 0

    @property
    def rank(self) -> int:
        """This peer's position in the current ring (may change between epochs)."""
        e = self._epoch
        return e.rank if e else -1

    @property
    def epoch(self) -> int:
        e = self._epoch
        return e.number if e else 0

    @property
    def lost(self) -> str | None:
        """Why this peer is no longer part of the group (master gone, expelled), or None."""
        return self._lost

    @property
    def peers(self) -> tuple[int, ...]:
        """Peer ids of the current members in ring order."""
        e = self._epoch
        return e.peer_ids if e else ()

    # ------------------------------------------------------------ lifecycle

    def connect(self, timeout: float = 30.0) -> "Communicator":
        """Join the group; returns once the master has admitted this peer.

        The first peer of a group is admitted at once; later ones at the
        members' next ``update_topology()``.
        """
        if self._connected:
            raise CCLError("connect() was already called on this Communicator")
        if self._closed:
            raise CCLError("this Communicator is closed; create a new one")
        deadline = time.monotonic() + timeout
        local_ip = self._control.open(timeout)
        try:
            self._dp = _core.DataPlane(local_ip, self.data_port, self.connections)
            adv_host, adv_port = self.advertise or (local_ip, self._dp.port)
            self._control.handshake(
                {
                    "type": "hello",
                    "version": 1,
                    "peer_group": self.peer_group,
                    "data_host": adv_host,
                    "data_port": adv_port,
                    "name": self.name[:128],
                    "beat": True,  # ask for the master's heartbeats (frozen-master detection)
                    **({"order": self.order} if self.order is not None else {}),
                },
                max(0.1, deadline - time.monotonic()),
            )
            # Data links use the master's liveness settings: keepalives at the
            # heartbeat interval, silence for heartbeat_timeout kills a link.
            self._dp.set_link_timeouts(self._control.heartbeat_interval, self._control.heartbeat_timeout)
            self._connected = True
            self._control.start(self._on_frame, self._on_lost)
            with self._cv:
                ok = self._cv.wait_for(
                    lambda: self._epoch is not None or self._lost is not None,
                    max(0.0, deadline - time.monotonic()),
                )
                if self._lost is not None:
                    raise CCLError(self._lost)
                if not ok:
                    raise Timeout(
                        f"not admitted within {timeout:.1f} s: the group's members must call update_topology()"
                    )
        except BaseException:
            self.close()
            raise
        log.info("peer %d admitted: rank %d of %d", self.peer_id, self.rank, self.world_size)
        return self

    def close(self) -> None:
        """Leave the group and release every thread, socket and port. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._control.close(say_bye=self._connected and self._lost is None)
        if self._dp is not None:
            self._dp.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._cv:
            self._cv.notify_all()

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- topology

    def update_topology(self) -> bool:
        """Admit waiting peers. Every member calls it; safe on every iteration.

        Waits for this peer's own outstanding async ops first. Returns True if
        the membership changed (joiners were admitted).

        The round a call votes in is named by this peer's program position:
        (collectives begun so far, update_topology calls since the last one).
        Members at the same point of the same program therefore vote in the
        same round, and a joiner inherits the position of the round that
        admitted it, so its first call lines up with the members' next one
        whether its loop starts with update_topology() or with a collective.
        """
        with self._cv:
            self._check_usable()
            self._cv.wait_for(lambda: self._inflight == 0 or self._lost is not None or self._closed)
            self._check_usable()
            if self._votes_since_op >= _VOTE_MASK:
                raise CCLError("update_topology() was called over a million times in a row without a collective")
            k = (self._ops_begun << _VOTE_BITS) | self._votes_since_op
            self._votes_since_op += 1
        log.debug("peer %d votes round %d", self.peer_id, k)
        self._control.send({"type": "vote", "round": k})
        with self._cv:
            self._cv.wait_for(lambda: k in self._round_results or self._lost is not None or self._closed)
            self._check_usable()
            return self._round_results.pop(k)

    # ------------------------------------------------------------ collectives

    def all_reduce(
        self,
        x: Any,
        out: Any = None,
        op: ReduceOp | str = ReduceOp.SUM,
        tag: int = 0,
        quantize: str | None = None,
    ) -> ReduceInfo:
        """Reduce ``x`` across the group, in place, or into ``out``.

        On ``PeerFailure`` the input holds exactly what it held before.

        ``quantize="uint8"`` (float32 only) sends uint8 codes with a min/max
        per chunk, about 4x fewer bytes; the result is still bit-identical on
        every peer (each segment's owner quantizes its final value once and
        keeps the decoded copy itself). NaN or Inf in the values raise
        ``MismatchError`` on every peer.
        """
        return self._execute(self._prepare_all_reduce(x, out, op, tag, quantize))

    def all_reduce_async(
        self,
        x: Any,
        out: Any = None,
        op: ReduceOp | str = ReduceOp.SUM,
        tag: int = 0,
        quantize: str | None = None,
    ) -> AsyncHandle:
        """Start an all-reduce and return at once; ops with distinct tags run concurrently.

        The op's place in the sequence is fixed now, in program order; its
        errors surface from ``handle.wait()``.
        """
        return self._submit(lambda: self._prepare_all_reduce(x, out, op, tag, quantize))

    def reduce_scatter(self, x: Any, out: Any, op: ReduceOp | str = ReduceOp.SUM, tag: int = 0) -> ReduceInfo:
        """Reduce ``x`` (world_size * m elements) across the group; rank r gets
        elements [r*m, (r+1)*m) of the result in ``out`` (m elements).

        A ring reduce-scatter (the first half of the ring all-reduce), not an
        all-reduce in disguise. ``x`` is never written.
        """
        return self._execute(self._prepare_pair(_core.Collective.REDUCE_SCATTER, x, out, op, tag, 0))

    def reduce_scatter_async(self, x: Any, out: Any, op: ReduceOp | str = ReduceOp.SUM, tag: int = 0) -> AsyncHandle:
        return self._submit(lambda: self._prepare_pair(_core.Collective.REDUCE_SCATTER, x, out, op, tag, 0))

    def all_gather(self, x: Any, out: Any, tag: int = 0) -> ReduceInfo:
        """Concatenate every rank's ``x`` (m elements) in rank order into ``out``
        (world_size * m elements) on every rank. A ring all-gather."""
        return self._execute(self._prepare_pair(_core.Collective.ALL_GATHER, x, out, ReduceOp.SUM, tag, 0))

    def all_gather_async(self, x: Any, out: Any, tag: int = 0) -> AsyncHandle:
        return self._submit(lambda: self._prepare_pair(_core.Collective.ALL_GATHER, x, out, ReduceOp.SUM, tag, 0))

    def broadcast(self, x: Any, root: int = 0, tag: int = 0) -> ReduceInfo:
        """Overwrite ``x`` on every rank with the bytes of rank ``root``'s ``x``
        (a pipelined ring from the root). Only the root's buffer is an input."""
        return self._execute(self._prepare_pair(_core.Collective.BROADCAST, x, None, ReduceOp.SUM, tag, root))

    def broadcast_async(self, x: Any, root: int = 0, tag: int = 0) -> AsyncHandle:
        return self._submit(lambda: self._prepare_pair(_core.Collective.BROADCAST, x, None, ReduceOp.SUM, tag, root))

    def _submit(self, prepare: Callable[[], "_Ticket"]) -> AsyncHandle:
        try:
            ticket = prepare()
        except CCLError as exc:
            fut: concurrent.futures.Future[ReduceInfo] = concurrent.futures.Future()
            fut.set_exception(exc)
            return AsyncHandle(fut)
        with self._cv:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="pyccl-op")
        try:
            return AsyncHandle(self._pool.submit(self._execute, ticket))
        except RuntimeError:  # pool shut down by close()
            self._finish_inflight()
            raise CCLError("this Communicator is closed") from None

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
        t0 = time.perf_counter()
        keys = state.describe()
        hashes = [content_hash(k.buffer) for k in keys]
        with self._cv:
            self._check_usable()
            if self._in_sync:
                raise CCLError("sync_shared_state is already running on this Communicator")
            self._cv.wait_for(lambda: self._inflight == 0 or self._lost is not None or self._closed)
            self._check_usable()
            self._in_sync = True
            self._sync_frames.clear()
        rx = tx = 0
        try:
            # Publish before asking: a fetcher may call the moment the plan is out.
            self._dp.state_publish([(k.buffer.ptr, k.nbytes, h) for k, h in zip(keys, hashes)])
            self._control.send(
                {
                    "type": "sync",
                    "revision": state.revision,
                    "strategy": strategy,
                    "keys": [[k.name, k.dtype, list(k.shape), k.nbytes, h] for k, h in zip(keys, hashes)],
                }
            )
            first = self._await_sync_frame(("sync_plan", "sync_result"))
            if first["type"] == "sync_result":
                raise CCLError(f"shared-state sync refused: {first.get('reason', '?')}")
            # A holder silent for a heartbeat timeout is given up (the timeout
            # restarts with every byte, so a slow but live holder is kept).
            ok, reason, rx = fetch_planned(first, keys, self.peer_id, timeout=self._control.heartbeat_timeout)
            self._control.send({"type": "sync_done", "sync": first.get("sync", 0), "ok": ok, "reason": reason[:1024]})
            result = self._await_sync_frame(("sync_result",))
        finally:
            tx = self._dp.state_unpublish()
            with self._cv:
                self._in_sync = False
        if not result.get("ok", False):
            raise CCLError(f"shared-state sync failed: {result.get('reason') or reason}")
        state.revision = int(result["revision"])
        return SyncInfo(state.revision, int(tx), int(rx), time.perf_counter() - t0)

    def _await_sync_frame(self, types: tuple[str, ...]) -> dict[str, Any]:
        with self._cv:
            self._cv.wait_for(
                lambda: any(t in self._sync_frames for t in types) or self._lost is not None or self._closed
            )
            for t in types:
                if t in self._sync_frames:
                    return self._sync_frames.pop(t)
            self._check_usable()
            raise CCLError("the shared-state sync was interrupted")

    # -------------------------------------------------------------- internals

    @staticmethod
    def _check_tag(tag: int) -> None:
        if not isinstance(tag, int) or not 0 <= tag <= MAX_TAG:
            raise ValueError(f"tag must be an integer in [0, 2**31), got {tag!r}")

    def _prepare_all_reduce(self, x: Any, out: Any, op: ReduceOp | str, tag: int,
                            quantize: str | None = None) -> "_Ticket":
        rop = ReduceOp.parse(op)
        self._check_tag(tag)
        if quantize not in (None, "uint8"):
            raise ValueError(f"quantize must be None or 'uint8', got {quantize!r}")
        src = as_buffer(x, "input", writable=out is None)
        if quantize and src.dtype_name != "float32":
            raise ValueError(f"quantize='uint8' takes float32 tensors, not {src.dtype_name}")
        dst: Buffer | None = None
        if out is not None:
            dst = as_buffer(out, "out", writable=True)
            if dst.dtype_code != src.dtype_code or dst.count != src.count:
                raise ValueError(
                    f"out has {dst.count} x {dst.dtype_name} but the input has {src.count} x {src.dtype_name}"
                )
            if dst.overlaps(src):
                raise ValueError("out overlaps the input; pass out=None for an in-place all-reduce")
        epoch, seq = self._begin_op(tag)
        kind = _core.Collective.ALL_REDUCE_Q8 if quantize else _core.Collective.ALL_REDUCE
        return _Ticket(kind, src, dst, rop, tag, 0, epoch, seq)

    def _prepare_pair(self, kind: Any, x: Any, out: Any, op: ReduceOp | str, tag: int, root: int) -> "_Ticket":
        """Validate a reduce-scatter / all-gather / broadcast call and give it its place."""
        rop = ReduceOp.parse(op)
        self._check_tag(tag)
        name = {_core.Collective.REDUCE_SCATTER: "reduce_scatter", _core.Collective.ALL_GATHER: "all_gather",
                _core.Collective.BROADCAST: "broadcast"}[kind]
        src = as_buffer(x, f"{name} input", writable=kind == _core.Collective.BROADCAST)
        dst: Buffer | None = None
        if out is not None:
            dst = as_buffer(out, f"{name} output", writable=True)
            if dst.dtype_code != src.dtype_code:
                raise ValueError(f"{name}: output is {dst.dtype_name} but the input is {src.dtype_name}")
            if dst.overlaps(src):
                raise ValueError(f"{name}: the output overlaps the input")
        if not isinstance(root, int) or root < 0:
            raise ValueError(f"broadcast root must be a non-negative rank, got {root!r}")
        epoch, seq = self._begin_op(tag)
        return _Ticket(kind, src, dst, rop, tag, root, epoch, seq)

    def _begin_op(self, tag: int) -> tuple[_Epoch, int]:
        with self._cv:
            self._check_usable()
            self._cv.wait_for(lambda: self._draining is None or self._lost is not None or self._closed)
            self._check_usable()
            assert self._epoch is not None
            self._ops_begun += 1
            self._votes_since_op = 0
            debt = self._fence_debt.get(tag, 0)
            if debt:
                # Other members started (and failed) this op in the epoch that
                # ended; fail it here too so every peer agrees on its outcome.
                self._fence_debt[tag] = debt - 1
                raise self._failure_for(self._drained_through)
            seq = self._next_seq.get(tag, 0)
            self._next_seq[tag] = seq + 1
            self._inflight += 1
            return self._epoch, seq

    def _finish_inflight(self) -> None:
        with self._cv:
            self._inflight -= 1
            self._cv.notify_all()

    def _execute(self, t: "_Ticket") -> ReduceInfo:
        t0 = time.perf_counter()
        scratch = None
        try:
            n = t.epoch.world_size
            src, dst = t.src, t.dst
            # Shapes that depend on the world size are checked against the
            # op's own epoch; every participant sees the same one, so they
            # all take this branch together and nobody waits for data.
            if t.kind == _core.Collective.REDUCE_SCATTER and (dst is None or src.count != dst.count * n):
                raise ValueError(f"reduce_scatter: the input must have world_size ({n}) x {dst.count if dst else '?'} "
                                 f"elements, it has {src.count}")
            if t.kind == _core.Collective.ALL_GATHER and (dst is None or dst.count != src.count * n):
                raise ValueError(f"all_gather: the output must have world_size ({n}) x {src.count} elements, "
                                 f"it has {dst.count if dst else '?'}")
            if t.kind == _core.Collective.BROADCAST and t.root >= n:
                raise ValueError(f"broadcast root {t.root} is not a rank of a world of {n}")
            count = src.count
            if t.kind in (_core.Collective.ALL_REDUCE, _core.Collective.ALL_REDUCE_Q8):
                if dst is None:
                    scratch = self._scratch.get(src.nbytes)
                    work_ptr = scratch.ctypes.data
                else:
                    work_ptr = dst.ptr
            elif t.kind == _core.Collective.REDUCE_SCATTER:
                scratch = self._scratch.get(src.nbytes)
                work_ptr = scratch.ctypes.data
            elif t.kind == _core.Collective.ALL_GATHER:
                assert dst is not None
                work_ptr, count = dst.ptr, dst.count
            else:  # broadcast: in place; the root's buffer is the input
                work_ptr = src.ptr
            kind, message, tx, rx = self._dp.collective(
                t.kind, t.root, t.epoch.number, t.tag, t.seq, src.ptr, work_ptr, count, src.dtype_code, int(t.rop)
            )
            if n > 1:
                self._report(kind, message, t.epoch.number, t.tag, t.seq)
                self._await_verdict(t.epoch.number, t.tag, t.seq, kind, message, t.name)
            elif kind != _core.FailKind.NONE:
                raise self._failure_for(t.epoch.number, local=(kind, message), what=t.name)
            # Committed: only now may the caller's buffers change.
            if t.kind in (_core.Collective.ALL_REDUCE, _core.Collective.ALL_REDUCE_Q8) and scratch is not None:
                _core.copy(src.ptr, work_ptr, src.nbytes)
            elif t.kind == _core.Collective.REDUCE_SCATTER:
                assert dst is not None
                _core.copy(dst.ptr, work_ptr + t.epoch.rank * dst.nbytes, dst.nbytes)
            return ReduceInfo(n, tx, rx, time.perf_counter() - t0, t.epoch.number, t.epoch.peer_ids)
        finally:
            if scratch is not None:
                self._scratch.put(scratch)
            self._finish_inflight()

    def _report(self, kind: Any, message: str, epoch: int, tag: int, seq: int) -> None:
        if kind == _core.FailKind.NONE:
            frame = {"type": "done", "epoch": epoch, "tag": tag, "seq": seq}
        elif kind == _core.FailKind.ABORTED:
            return  # the master already ended this epoch
        else:
            frame = {
                "type": "failed",
                "epoch": epoch,
                "tag": tag,
                "seq": seq,
                "kind": "mismatch" if kind == _core.FailKind.MISMATCH else ("protocol" if kind == _core.FailKind.PROTOCOL else "peer"),
                "reason": message[:1024],
            }
        try:
            self._control.send(frame)
        except CCLError:
            pass  # the lost-connection path wakes the waiter below

    def _await_verdict(self, epoch: int, tag: int, seq: int, kind: Any, message: str, what: str) -> None:
        key = (epoch, tag, seq)
        with self._cv:
            # Wait for op_ok, or for the drain of this epoch and the epoch after it.
            self._cv.wait_for(
                lambda: key in self._decided
                or (self._drained_through >= epoch and self._draining is None)
                or self._lost is not None
                or self._closed
            )
            if key in self._decided:
                self._decided.discard(key)
                return
            raise self._failure_for(epoch, local=(kind, message), what=what)

    def _failure_for(self, epoch: int, local: tuple[Any, str] | None = None, what: str = "collective") -> CCLError:
        """The exception for an op of ``epoch`` that did not succeed."""
        if self._closed:
            return CCLError("the Communicator was closed while the op was running")
        if self._lost is not None:
            return CCLError(self._lost)
        drain = self._drains.get(epoch)
        if local is not None and local[0] == _core.FailKind.MISMATCH:
            return MismatchError(local[1])
        if drain is not None and drain.kind == "mismatch":
            return MismatchError(drain.reason)
        why = drain.reason if drain is not None else (local[1] if local else "the membership changed")
        return PeerFailure(
            f"{what} aborted because the group changed ({why}); world size is now {self.world_size}: retry the call"
        )

    def _check_usable(self) -> None:
        if self._closed:
            raise CCLError("this Communicator is closed; create a new one to rejoin")
        if not self._connected:
            raise CCLError("call connect() before using the Communicator")
        if self._lost is not None:
            raise CCLError(f"{self._lost}; this peer is no longer part of the group, create a new Communicator")

    # ------------------------------------------------- control-thread events

    def _on_frame(self, frame: dict[str, Any]) -> None:
        handler = self._HANDLERS.get(frame["type"])
        if handler is None:
            log.warning("ignoring unknown frame type %r from the master", frame["type"])
            return
        handler(self, frame)

    def _on_epoch(self, frame: dict[str, Any]) -> None:
        from pyccl import wire

        number = wire.get_int(frame, "epoch")
        raw = frame.get("members")
        if not isinstance(raw, list) or not raw:
            raise wire.FrameError("'epoch' field 'members' must be a non-empty list")
        members = []
        for m in raw:
            if not (isinstance(m, list) and len(m) == 3 and isinstance(m[0], int) and isinstance(m[1], str) and isinstance(m[2], int)):
                raise wire.FrameError(f"'epoch' member entry {m!r} is not [peer_id, host, port]")
            members.append((m[0], m[1], m[2]))
        fence = wire.get_pairs(frame, "fence", 4096)
        ids = [m[0] for m in members]
        me = self.peer_id
        if me not in ids:
            raise wire.FrameError(f"epoch {number} does not include this peer ({me})")
        rank = ids.index(me)
        n = len(members)
        nxt = members[(rank + 1) % n]
        prev = members[(rank - 1) % n]
        # Data plane first: an op that sees the new epoch must find its links.
        self._dp.set_epoch(number, me, rank, n, nxt[0], nxt[1], nxt[2], prev[0])
        with self._cv:
            admitted_now = self._epoch is None
            if admitted_now:
                position = wire.get_int(frame, "next_round")
                self._ops_begun = position >> _VOTE_BITS
                self._votes_since_op = position & _VOTE_MASK
            else:
                for tag, target in fence:
                    owed = target - self._next_seq.get(tag, 0)
                    if owed > 0:
                        self._fence_debt[tag] = self._fence_debt.get(tag, 0) + owed
            self._epoch = _Epoch(number, tuple(members), rank)
            self._next_seq = {}
            self._draining = None
            self._cv.notify_all()
        log.info("epoch %d: rank %d of %d (%s)", number, rank, n, frame.get("reason", ""))

    def _on_drain(self, frame: dict[str, Any]) -> None:
        from pyccl import wire

        number = wire.get_int(frame, "epoch")
        kind = wire.get_str(frame, "kind", 32)
        reason = wire.get_str(frame, "reason", 4096, optional=True)
        with self._cv:
            self._draining = number
            self._drained_through = max(self._drained_through, number)
            self._drains[number] = _Drain(kind, reason)
            for old in [e for e in self._drains if e < number - 16]:
                del self._drains[old]
            started = sorted(self._next_seq.items())
            self._cv.notify_all()
        self._dp.abort_through(number, f"the master ended epoch {number}: {reason}")
        self._control.send({"type": "drained", "epoch": number, "next_seq": [[t, n] for t, n in started]})

    def _on_op_ok(self, frame: dict[str, Any]) -> None:
        from pyccl import wire

        key = (wire.get_int(frame, "epoch"), wire.get_int(frame, "tag", 0, MAX_TAG), wire.get_int(frame, "seq"))
        with self._cv:
            self._decided.add(key)
            self._cv.notify_all()

    def _on_round_done(self, frame: dict[str, Any]) -> None:
        from pyccl import wire

        k = wire.get_int(frame, "round")
        changed = bool(frame.get("changed", False))
        log.debug("peer %d: round %d done (changed=%s)", self.peer_id, k, changed)
        with self._cv:
            self._round_results[k] = changed
            self._cv.notify_all()

    def _on_sync_frame(self, frame: dict[str, Any]) -> None:
        with self._cv:
            self._sync_frames[frame["type"]] = frame
            self._cv.notify_all()

    def _on_error(self, frame: dict[str, Any]) -> None:
        reason = str(frame.get("reason", "no reason given"))[:1024]
        log.error("the master closed this peer's session: %s", reason)
        self._on_lost(f"the master removed this peer: {reason}")

    def _on_welcome(self, frame: dict[str, Any]) -> None:
        log.warning("ignoring a second 'welcome' from the master")

    _HANDLERS = {
        "epoch": _on_epoch,
        "drain": _on_drain,
        "op_ok": _on_op_ok,
        "round_done": _on_round_done,
        "error": _on_error,
        "welcome": _on_welcome,
        "sync_plan": _on_sync_frame,
        "sync_result": _on_sync_frame,
    }

    def _on_lost(self, reason: str) -> None:
        with self._cv:
            if self._lost is None:
                self._lost = reason
            self._cv.notify_all()
        if not self._closed:
            log.warning("%s", reason)
        if self._dp is not None:
            self._dp.abort_through(2**63 - 1, reason)
