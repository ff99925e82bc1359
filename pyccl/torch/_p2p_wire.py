"""The side channel's messages: wire layout, the posted receive and send
records, and the membership proof (see :mod:`pyccl.torch._p2p`)."""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyccl import auth

MAGIC = 0x50325031  # "1P2P"
HEADER = struct.Struct("<IBxxxiqQI")  # magic, kind, source rank, tag, nbytes, key length
KIND_P2P = 0
KIND_A2A = 1
KIND_MONITOR = 2  # monitored_barrier's tokens
KINDS = (KIND_P2P, KIND_A2A, KIND_MONITOR)
MAX_KEY = 4096
NONCE_BYTES = auth.NONCE_BYTES
PROOF_BYTES = 32

Done = Callable[[int, BaseException | None], None]  # (source rank, error)


def mv_of(t: torch.Tensor) -> memoryview:
    """Writable byte memoryview of a contiguous uint8 tensor."""
    if t.numel() == 0:
        return memoryview(bytearray(0))
    return memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]  # numpy arrays export the buffer protocol


class Recv:
    """A posted receive; ``settle`` reports it exactly once (reader or monitor)."""

    __slots__ = ("buf", "src", "tag", "kind", "_done", "_lock", "settled")

    def __init__(self, buf: torch.Tensor, src: int, tag: int, kind: int, done: Done) -> None:
        self.buf, self.src, self.tag, self.kind = buf, src, tag, kind  # src -1: any source
        self._done = done
        self._lock = threading.Lock()
        self.settled = False

    def settle(self, src: int, error: BaseException | None) -> None:
        with self._lock:
            if self.settled:
                return
            self.settled = True
        self._done(src, error)


class Send:
    """A posted send; ``settle`` reports it exactly once (sender thread or monitor)."""

    __slots__ = ("key", "kind", "src", "tag", "buf", "credential", "_done", "_lock", "settled")

    def __init__(self, key: bytes, kind: int, src: int, tag: int, buf: torch.Tensor,
                 done: Callable[[BaseException | None], None], credential: Callable[[], bytes]) -> None:
        self.key, self.kind, self.src, self.tag, self.buf = key, kind, src, tag, buf
        self.credential = credential
        self._done = done
        self._lock = threading.Lock()
        self.settled = False

    def settle(self, error: BaseException | None) -> bool:
        with self._lock:
            if self.settled:
                return False
            self.settled = True
        self._done(error)
        return True


@dataclass
class Unexpected:
    src: int
    data: bytearray


def proof(key: bytes, nonce: bytes, hdr: bytes, group: bytes) -> bytes:
    """A group's proof of membership on a side-channel connection (first message only)."""
    return hmac.new(key, b"pyccl-v1 p2p" + nonce + hdr + group, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, mv: memoryview, n: int) -> None:
    got = 0
    while got < n:
        k = sock.recv_into(mv[got:n], n - got)
        if k == 0:
            raise ConnectionError("the connection closed in the middle of a message")
        got += k
