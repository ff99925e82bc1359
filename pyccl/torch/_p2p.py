"""Point-to-point side channel: send/recv and all-to-all for the torch backend.

The pyccl core only has ring collectives, so point-to-point traffic takes a
small pure-Python channel next to it: one :class:`Hub` per process listens on
a TCP port of the address the Communicators use; its address is published in
every pyccl process group's store (``pyccl/p2p/<rank>``). A process opens one
outgoing connection per destination hub, lazily, and a sender thread per
connection writes messages in the order they were posted, so messages from
one rank to another arrive in order (what torch's tag matching needs). Every
incoming connection has a reader thread.

A message is a header (:data:`HEADER`: magic, kind, source rank, tag, byte
count, key length) followed by the key (the process group's name, so one hub
serves every group) and the payload: the tensor's bytes, sent straight from
and received straight into tensor memory when the receive is already posted
(otherwise it waits in an "unexpected" queue until it is).

Failures: a connection that breaks fails what was in flight on it; and on
every membership event of a group's Communicator (a drain, a new epoch, the
master lost: the master decides them within milliseconds of a SIGKILL and
within the heartbeat timeout of a hang) the group asks whether it is still
whole and, if not, fails every pending transfer of its endpoint, so a
receive from a dead rank never hangs.
"""

from __future__ import annotations

import collections
import logging
import queue
import socket
import threading
from collections.abc import Callable

import torch
from pyccl import auth
from pyccl.torch._p2p_wire import (
    HEADER,
    KIND_A2A,
    KIND_MONITOR,
    KIND_P2P,
    KINDS,
    MAGIC,
    MAX_KEY,
    NONCE_BYTES,
    PROOF_BYTES,
    Done,
    Recv,
    Send,
    Unexpected,
    mv_of,
    proof,
    recv_exact,
)
from pyccl.torch._work import BackendError

log = logging.getLogger("pyccl.torch")

__all__ = ["Endpoint", "Hub", "KIND_P2P", "KIND_A2A", "KIND_MONITOR"]

class Endpoint:
    """One process group's mailbox on the hub."""

    def __init__(
        self,
        hub: Hub,
        key: str,
        rank: int,
        address_of: Callable[[int], str],
        health: Callable[[], str | None],
    ) -> None:
        self.hub = hub
        self.key = key
        self.key_bytes = key.encode()
        self.rank = rank
        self._address_of = address_of
        self._addresses: dict[int, str] = {}
        self._health = health
        self._lock = threading.Lock()
        self._posted: list[Recv] = []
        self._filling: list[Recv] = []  # matched, payload being received
        self._unexpected: dict[tuple[int, int], collections.deque[Unexpected]] = {}  # (kind, tag)
        self._send_objs: dict[int, tuple[Send, _Conn]] = {}
        self._closed: str | None = None
        # The group's membership key (its Communicator's epoch key; empty in
        # an open run or before the group formed): proves this group's first
        # message on every connection in a run with a secret.
        self.credential: Callable[[], bytes] = lambda: b""

    # ------------------------------------------------------------- posting

    def post_recv(self, buf: torch.Tensor, src: int, tag: int, kind: int, done: Done) -> None:
        with self._lock:
            if self._closed is not None:
                err: BaseException | None = BackendError(self._closed)
            else:
                err = None
                q = self._unexpected.get((kind, tag))
                hit = None
                if q:
                    for m in q:
                        if src < 0 or m.src == src:
                            hit = m
                            break
                    if hit is not None:
                        q.remove(hit)
                if hit is None:
                    self._posted.append(Recv(buf, src, tag, kind, done))
                    return
        if err is not None:
            done(src, err)
            return
        assert hit is not None
        done(hit.src, self._deliver(buf, hit.data, hit.src, tag))


    @staticmethod
    def _deliver(buf: torch.Tensor, data: bytearray | memoryview, src: int, tag: int) -> BaseException | None:
        if len(data) != buf.numel():
            return BackendError(
                f"pyccl: message from rank {src} (tag {tag}) has {len(data)} bytes, the receive expects {buf.numel()}"
            )
        if len(data):
            mv_of(buf)[:] = data
        return None

    def send(self, buf: torch.Tensor, dst: int, tag: int, kind: int, done: Callable[[BaseException | None], None]) -> None:
        with self._lock:
            if self._closed is not None:
                err = BackendError(self._closed)
            else:
                err = None
        if err is not None:
            done(err)
            return
        def finished(error: BaseException | None) -> None:
            with self._lock:
                self._send_objs.pop(id(item), None)
            done(error)

        item = Send(self.key_bytes, kind, self.rank, tag, buf, finished, self.credential)
        try:
            address = self._addresses.get(dst)
            if address is None:
                address = self._address_of(dst)
                self._addresses[dst] = address
            conn = self.hub.connection(address)
        except BaseException as exc:  # noqa: BLE001 - reported through the work
            item.settle(BackendError(f"pyccl: cannot reach rank {dst} for a point-to-point send: {exc}"))
            return
        with self._lock:
            self._send_objs[id(item)] = (item, conn)
        conn.post(item)

    # -------------------------------------------------------- from readers

    def incoming(self, sock: socket.socket, kind: int, src: int, tag: int, nbytes: int) -> None:
        """Called on a reader thread with the payload still on the socket."""
        with self._lock:
            rec = self._match(kind, src, tag)
            if rec is not None:
                self._filling.append(rec)
        if rec is not None and rec.buf.numel() == nbytes:
            try:
                recv_exact(sock, mv_of(rec.buf), nbytes)
            finally:
                with self._lock:
                    self._filling.remove(rec)
            rec.settle(src, None)
            return
        data = bytearray(nbytes)
        if nbytes:
            recv_exact(sock, memoryview(data), nbytes)
        if rec is not None:  # size mismatch
            with self._lock:
                self._filling.remove(rec)
            rec.settle(src, self._deliver(rec.buf, data, src, tag))
            return
        with self._lock:
            rec = self._match(kind, src, tag)
            if rec is None:
                self._unexpected.setdefault((kind, tag), collections.deque()).append(Unexpected(src, data))
                return
        rec.settle(src, self._deliver(rec.buf, data, src, tag))

    def _match(self, kind: int, src: int, tag: int) -> Recv | None:
        for i, r in enumerate(self._posted):
            if r.kind == kind and r.tag == tag and r.src == src:
                return self._posted.pop(i)
        for i, r in enumerate(self._posted):
            if r.kind == kind and r.tag == tag and r.src < 0:
                return self._posted.pop(i)
        return None

    # ------------------------------------------------------------ failures

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._posted or self._filling or self._send_objs)

    def check(self) -> None:
        """Fail everything pending if the group broke (called on every
        membership event of the group's Communicator)."""
        if not self.has_pending():
            return
        try:
            why = self._health()
        except BaseException as exc:  # noqa: BLE001
            why = f"pyccl: health check failed: {exc}"
        if why:
            self.fail_all(why)

    def fail_all(self, why: str, close: bool = False) -> None:
        with self._lock:
            if close:
                self._closed = why
            posted, self._posted = self._posted + self._filling, []
            sends = list(self._send_objs.values())
            self._send_objs.clear()
        for r in posted:
            r.settle(r.src, BackendError(why))
        for item, conn in sends:
            item.settle(BackendError(why))
            conn.abort_if_busy(item)

    def cancel_recvs(self, kind: int, tag: int, why: str) -> None:
        """Fail the posted receives of ``kind``/``tag`` (a caller gave up on them)."""
        with self._lock:
            victims = [r for r in self._posted if r.kind == kind and r.tag == tag]
            self._posted = [r for r in self._posted if not (r.kind == kind and r.tag == tag)]
        for r in victims:
            r.settle(r.src, BackendError(why))

    def fail_source(self, src: int, why: str) -> None:
        with self._lock:
            victims = [r for r in self._posted if r.src == src]
            self._posted = [r for r in self._posted if r.src != src]
        for r in victims:
            r.settle(src, BackendError(why))


class _Conn:
    """Outgoing connection to one remote hub, with its sender thread."""

    def __init__(self, hub: Hub, address: str) -> None:
        self.hub = hub
        self.address = address
        self._q: queue.SimpleQueue[Send | None] = queue.SimpleQueue()
        self._sock: socket.socket | None = None
        self._busy: Send | None = None
        self._dead: str | None = None
        self._lock = threading.Lock()
        self._nonce = b""  # the remote hub's challenge (a run with a secret)
        self._proven: set[bytes] = set()  # groups whose membership this connection proved
        self._thread = threading.Thread(target=self._loop, name=f"pyccl-p2p-send-{address}", daemon=True)
        self._thread.start()

    @property
    def dead(self) -> bool:
        return self._dead is not None

    def post(self, item: Send) -> None:
        self._q.put(item)

    def _connect(self) -> socket.socket:
        host, _, port = self.address.rpartition(":")
        s = socket.create_connection((host, int(port)), timeout=30.0)
        if self.hub.authenticate:
            nonce = bytearray(NONCE_BYTES)
            recv_exact(s, memoryview(nonce), NONCE_BYTES)
            self._nonce = bytes(nonce)
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if item.settled:
                continue
            if self._dead is not None:
                item.settle(BackendError(self._dead))
                continue
            try:
                if self._sock is None:
                    self._sock = self._connect()
                with self._lock:
                    self._busy = item
                hdr = HEADER.pack(MAGIC, item.kind, item.src, item.tag, item.buf.numel(), len(item.key))
                self._sock.sendall(hdr + item.key + self._proof(item, hdr))
                if item.buf.numel():
                    self._sock.sendall(mv_of(item.buf))
                with self._lock:
                    self._busy = None
                item.settle(None)
            except (OSError, ValueError) as exc:
                with self._lock:
                    self._busy = None
                self._dead = f"pyccl: point-to-point connection to {self.address} failed: {exc}"
                item.settle(BackendError(self._dead))
                self._shutdown_sock()

    def _proof(self, item: Send, hdr: bytes) -> bytes:
        """The group's first message on this connection carries its proof of membership."""
        if not self.hub.authenticate or item.key in self._proven:
            return b""
        key = item.credential()
        if not key:
            raise ValueError("this process group has no membership key yet (a run with a secret)")
        self._proven.add(item.key)
        return proof(key, self._nonce, hdr, item.key)

    def abort_if_busy(self, item: Send) -> None:
        with self._lock:
            busy = self._busy is item
        if busy:
            self._dead = "pyccl: point-to-point send aborted"
            self._shutdown_sock()

    def _shutdown_sock(self) -> None:
        """Wake the sender and end the connection; the descriptor stays open
        until close() has joined the sender (a closed number is reused at
        once, and a sender about to write would write to the new owner)."""
        s = self._sock
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._q.put(None)
        self._shutdown_sock()
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
            if self._sock is not None and not self._thread.is_alive():
                self._sock.close()


class Hub:
    """The process's point-to-point listener and connections."""

    def __init__(self, host: str, authenticate: bool = False) -> None:
        self.authenticate = authenticate  # a run with a secret: every group proves membership
        self._listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(128)
        port = self._listener.getsockname()[1]
        self.address = f"{host}:{port}"
        self._lock = threading.Lock()
        self._endpoints: dict[str, Endpoint] = {}
        self._orphans: dict[str, list[tuple[int, int, int, bytearray]]] = {}
        self._conns: dict[str, _Conn] = {}
        self._readers: list[tuple[socket.socket, threading.Thread]] = []
        self._stop = threading.Event()
        self._changed = threading.Condition(self._lock)  # an endpoint registered, or a credential changed
        self._refused_from: set[str] = set()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="pyccl-p2p-accept", daemon=True)
        self._accept_thread.start()

    # ------------------------------------------------------------ endpoints

    def register(self, ep: Endpoint) -> None:
        with self._lock:
            if ep.key in self._endpoints:
                raise BackendError(f"pyccl: process group {ep.key!r} is already registered")
            self._endpoints[ep.key] = ep
            orphans = self._orphans.pop(ep.key, [])
            self._changed.notify_all()
        for kind, src, tag, data in orphans:
            with ep._lock:
                ep._unexpected.setdefault((kind, tag), collections.deque()).append(Unexpected(src, data))

    def unregister(self, ep: Endpoint) -> None:
        with self._lock:
            if self._endpoints.get(ep.key) is ep:
                del self._endpoints[ep.key]
            self._orphans.pop(ep.key, None)

    def credentials_changed(self) -> None:
        """A group's membership key may have changed (its Communicator's
        membership listener): wake readers waiting to check a proof."""
        with self._lock:
            self._changed.notify_all()

    def _verified_endpoint(self, s: socket.socket, nonce: bytes, hdr: bytes, key: str) -> Endpoint | None:
        """A run with a secret: the group's first message on a connection
        carries a proof; wait (bounded) until the group is registered here
        and has its key, then check it. None: refused."""
        mac = bytearray(PROOF_BYTES)
        recv_exact(s, memoryview(mac), PROOF_BYTES)
        with self._lock:
            self._changed.wait_for(lambda: self._stop.is_set() or (
                key in self._endpoints and bool(self._endpoints[key].credential())), timeout=60.0)
            ep = self._endpoints.get(key)
        if ep is not None and auth.same(bytes(mac), proof(ep.credential(), nonce, hdr, key.encode())):
            return ep
        source = s.getpeername()[0] if not self._stop.is_set() else "?"
        if source not in self._refused_from:
            self._refused_from.add(source)
            log.warning("pyccl: refused a point-to-point connection from %s: no valid proof of membership of "
                        "process group %r (further refusals from it are not logged)", source, key)
        return None

    def endpoint_count(self) -> int:
        with self._lock:
            return len(self._endpoints)

    def connection(self, address: str) -> _Conn:
        with self._lock:
            if self._stop.is_set():
                raise BackendError("the point-to-point channel is closed")
            c = self._conns.get(address)
            if c is None or c.dead:
                if c is not None:
                    c.close()
                c = _Conn(self, address)
                self._conns[address] = c
            return c

    # -------------------------------------------------------------- threads

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                s, _ = self._listener.accept()
            except OSError:
                return
            if self._stop.is_set():
                s.close()
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._read_loop, args=(s,), name="pyccl-p2p-recv", daemon=True)
            with self._lock:
                self._readers = [(rs, rt) for rs, rt in self._readers if rt.is_alive()]
                self._readers.append((s, t))
            t.start()

    def _read_loop(self, s: socket.socket) -> None:
        seen: set[tuple[str, int]] = set()
        hdr = bytearray(HEADER.size)
        why = "the connection closed"
        proven: set[str] = set()  # groups this connection proved membership of
        try:
            nonce = auth.new_nonce() if self.authenticate else b""
            if nonce:
                s.sendall(nonce)
            while not self._stop.is_set():
                try:
                    recv_exact(s, memoryview(hdr), HEADER.size)
                except ConnectionError:
                    return
                magic, kind, src, tag, nbytes, klen = HEADER.unpack(hdr)
                if magic != MAGIC or klen > MAX_KEY or kind not in KINDS:
                    why = "a malformed message arrived"
                    log.warning("pyccl: dropping a point-to-point connection: bad header")
                    return
                kb = bytearray(klen)
                recv_exact(s, memoryview(kb), klen)
                key = kb.decode(errors="replace")
                if self.authenticate and key not in proven:
                    if self._verified_endpoint(s, nonce, bytes(hdr), key) is None:
                        why = "it did not prove membership"
                        return
                    proven.add(key)
                with self._lock:
                    ep = self._endpoints.get(key)
                if ep is None:
                    data = bytearray(nbytes)
                    if nbytes:
                        recv_exact(s, memoryview(data), nbytes)
                    with self._lock:
                        ep = self._endpoints.get(key)
                        if ep is None:
                            self._orphans.setdefault(key, []).append((kind, src, tag, data))
                            continue
                    with ep._lock:
                        ep._unexpected.setdefault((kind, tag), collections.deque()).append(Unexpected(src, data))
                    continue
                seen.add((key, src))
                ep.incoming(s, kind, src, tag, nbytes)
        except (OSError, ConnectionError) as exc:
            why = f"the connection failed ({exc})"
        finally:
            s.close()
            if not self._stop.is_set():
                for key, src in seen:
                    with self._lock:
                        ep = self._endpoints.get(key)
                    if ep is not None:
                        ep.fail_source(src, f"pyccl: lost the point-to-point connection from rank {src}: {why}")

    # ------------------------------------------------------------- shutdown

    def close(self) -> None:
        self._stop.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
            readers = list(self._readers)
            self._readers.clear()
            eps = list(self._endpoints.values())
        for ep in eps:
            ep.fail_all("pyccl: the point-to-point channel was closed", close=True)
        for c in conns:
            c.close()
        for s, _ in readers:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for s, t in readers:
            t.join(5.0)
            s.close()
        self._accept_thread.join(5.0)
        self._listener.close()  # only now: see _Conn._shutdown_sock

