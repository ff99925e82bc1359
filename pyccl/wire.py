"""Control-plane framing: ``u32 big-endian length | msgpack map``.

Shared by the master (asyncio) and the peer's control client (blocking
sockets). Decoding never trusts the peer: lengths are bounded before any
allocation, msgpack limits are set, and the result must be a map with a
string ``type``. Field-level validation lives with whoever consumes the frame
(the typed frames of :mod:`pyccl.protocol`),
using the small checkers below.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Collection, Mapping
from typing import Any

import msgpack

MAX_FRAME_BYTES = 1 << 20
_LEN = struct.Struct(">I")
MAX_INT = (1 << 63) - 1
MAX_TAG = (1 << 31) - 1
MAX_UINT64 = (1 << 64) - 1


class FrameError(ValueError):
    """A frame that cannot be accepted; the message says why."""


def encode(frame: Mapping[str, Any]) -> bytes:
    """Serialise one frame (length prefix included)."""
    body: bytes = msgpack.packb(frame, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return _LEN.pack(len(body)) + body


def decode_length(header: bytes) -> int:
    """Return the body length announced by a 4-byte header, or raise FrameError."""
    n: int = _LEN.unpack(header)[0]
    if n == 0:
        raise FrameError("empty frame")
    if n > MAX_FRAME_BYTES:
        raise FrameError(f"frame length {n} exceeds the {MAX_FRAME_BYTES}-byte limit")
    return n


def decode_body(body: bytes) -> dict[str, Any]:
    """Unpack a frame body into a dict with a string ``type``, or raise FrameError."""
    try:
        # No size knobs needed: the body is already bounded by decode_length,
        # and unpackb caps every container/string at the input's length.
        # (max_buffer_size exists only on msgpack.Unpacker, not unpackb.)
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:
        raise FrameError(f"undecodable msgpack ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise FrameError(f"frame is a {type(obj).__name__}, expected a map")
    t = obj.get("type")
    if not isinstance(t, str):
        raise FrameError("frame has no string 'type' field")
    return obj


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """Blocking read of one frame. Raises ConnectionError on EOF, FrameError on garbage."""
    n = decode_length(_recv_exact(sock, 4))
    return decode_body(_recv_exact(sock, n))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by the other side")
        got += k
    return bytes(buf)


# ---------------------------------------------------------------- field checks
#
# Every checker raises FrameError with a message naming the frame type and the
# field. Messages end up in logs and in ``error`` frames, so anything echoed
# from the (untrusted) frame is clipped first: a 1 MiB string must not become
# a 1 MiB log line.


def clip(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (for messages and logs)."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _ftype(frame: Mapping[str, Any]) -> str:
    t = frame.get("type")
    return t if isinstance(t, str) and len(t) <= 32 else clip(t, 32)


def get_int(frame: Mapping[str, Any], key: str, lo: int = 0, hi: int = MAX_INT) -> int:
    """Field ``key`` as an int in ``[lo, hi]`` (bools are not ints here)."""
    v = frame.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise FrameError(f"'{_ftype(frame)}' field '{key}' must be an integer")
    if not lo <= v <= hi:
        raise FrameError(f"'{_ftype(frame)}' field '{key}'={v} outside [{lo}, {hi}]")
    return v


def get_str(frame: Mapping[str, Any], key: str, max_len: int, optional: bool = False) -> str:
    """Field ``key`` as a str of at most ``max_len`` characters; ``""`` if optional and absent."""
    v = frame.get(key)
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise FrameError(f"'{_ftype(frame)}' field '{key}' must be a string")
    if len(v) > max_len:
        raise FrameError(f"'{_ftype(frame)}' field '{key}' longer than {max_len}")
    return v


def get_float(frame: Mapping[str, Any], key: str, lo: float, hi: float) -> float:
    """Field ``key`` as a float in ``[lo, hi]`` (ints accepted, bools and NaN not)."""
    v = frame.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise FrameError(f"'{_ftype(frame)}' field '{key}' must be a number in [{lo}, {hi}]")
    return float(v)


def get_bool(frame: Mapping[str, Any], key: str) -> bool:
    """Field ``key`` as a bool (ints are not accepted)."""
    v = frame.get(key)
    if not isinstance(v, bool):
        raise FrameError(f"'{_ftype(frame)}' field '{key}' must be a boolean")
    return v


def get_choice(frame: Mapping[str, Any], key: str, choices: Collection[str]) -> str:
    """Field ``key`` as one of the strings in ``choices``."""
    v = frame.get(key)
    if not isinstance(v, str) or v not in choices:
        raise FrameError(f"'{_ftype(frame)}' field '{key}'={clip(v, 40)} is not one of {sorted(choices)}")
    return v


def get_pairs(frame: Mapping[str, Any], key: str, max_len: int, hi_first: int = MAX_TAG,
              hi_second: int = MAX_INT) -> list[tuple[int, int]]:
    """A list of ``[int, int]`` pairs (tag counters, fences; ``sync_plan``'s ``fetch``
    with ``hi_second=MAX_UINT64``, since content hashes use all 64 bits)."""
    v = frame.get(key)
    if not isinstance(v, (list, tuple)) or len(v) > max_len:
        raise FrameError(f"'{_ftype(frame)}' field '{key}' must be a list of at most {max_len} pairs")
    out = []
    for item in v:
        if (
            not isinstance(item, (list, tuple))
            or len(item) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            or not 0 <= item[0] <= hi_first
            or not 0 <= item[1] <= hi_second
        ):
            raise FrameError(f"'{_ftype(frame)}' field '{key}' has a malformed pair {clip(item, 60)}")
        out.append((int(item[0]), int(item[1])))
    return out


def get_list(frame: Mapping[str, Any], key: str, max_len: int) -> list[Any]:
    """Field ``key`` as a list (msgpack array) of at most ``max_len`` entries; entries unchecked."""
    v = frame.get(key)
    if not isinstance(v, (list, tuple)):
        raise FrameError(f"'{_ftype(frame)}' field '{key}' must be a list")
    if len(v) > max_len:
        raise FrameError(f"'{_ftype(frame)}' field '{key}' has {len(v)} entries, more than {max_len}")
    return list(v)


def is_int(v: Any, lo: int = 0, hi: int = MAX_INT) -> bool:
    """True if ``v`` is an int (not a bool) in ``[lo, hi]``: for checking list entries."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
