"""A collective call on its way to the data plane: validation, its ticket,
the work buffer it runs in, and what it returns.

:func:`check_call` validates what can be checked before the op takes its
place in the sequence (dtypes, overlaps, the quantize option);
:func:`check_for_epoch` what depends on the world size of the op's epoch
(every participant sees the same one, so they all fail together and nobody
waits for data). :class:`WorkBuffers` picks where the ring writes: never
the caller's input, so a failed op leaves it intact.
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyccl import _core
from pyccl.errors import Timeout
from pyccl.peer.hierarchy import use_two_level
from pyccl.peer.state import EpochView, LocalResult, OpTicket
from pyccl.types import Buffer, ReduceOp, as_buffer
from pyccl.wire import MAX_TAG

COLLECTIVE_NAMES = {
    _core.Collective.ALL_REDUCE: "all_reduce",
    _core.Collective.ALL_REDUCE_Q8: "all_reduce(quantize='uint8')",
    _core.Collective.REDUCE_SCATTER: "reduce_scatter",
    _core.Collective.ALL_GATHER: "all_gather",
    _core.Collective.BROADCAST: "broadcast",
}

LOCAL_RESULTS = {
    _core.FailKind.NONE: LocalResult.OK,
    _core.FailKind.PEER: LocalResult.PEER,
    _core.FailKind.MISMATCH: LocalResult.MISMATCH,
    _core.FailKind.PROTOCOL: LocalResult.PROTOCOL,
    _core.FailKind.ABORTED: LocalResult.ABORTED,
    _core.FailKind.INVALID: LocalResult.INVALID,
}


@dataclass(frozen=True)
class ReduceInfo:
    """What a collective did: who took part and what it cost.

    ``peers`` are the master-assigned ids of the participants in ring order
    and ``epoch`` the membership epoch the op ran in, so a caller can tell
    exactly which inputs were reduced; ``two_level``: the all-reduce ran in
    two levels across regions (:mod:`pyccl.peer.hierarchy`).
    """

    world_size: int
    tx_bytes: int
    rx_bytes: int
    seconds: float
    epoch: int = 0
    peers: tuple[int, ...] = ()
    two_level: bool = False


@dataclass(frozen=True)
class Call:
    """A validated collective call, before it has its place in the sequence."""

    kind: Any  # _core.Collective
    src: Buffer
    dst: Buffer | None
    rop: ReduceOp
    root: int

    @property
    def name(self) -> str:
        return COLLECTIVE_NAMES.get(self.kind, "collective")


@dataclass(frozen=True)
class Ticket:
    """A call with its place in the sequence, ready to run."""

    call: Call
    op: OpTicket


class AsyncHandle:
    """Handle of an ``*_async`` collective; ``wait()`` returns its ReduceInfo or raises its error."""

    def __init__(self, future: concurrent.futures.Future[ReduceInfo]) -> None:
        self._future = future

    def wait(self, timeout: float | None = None) -> ReduceInfo:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            raise Timeout(f"the collective did not finish within {timeout} s", seconds=timeout or 0.0) from exc

    def done(self) -> bool:
        return self._future.done()


class ScratchPool:
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


def check_tag(tag: int) -> None:
    if not isinstance(tag, int) or not 0 <= tag <= MAX_TAG:
        raise ValueError(f"tag must be an integer in [0, 2**31), got {tag!r}")


def all_reduce_call(x: Any, out: Any, op: ReduceOp | str, tag: int, quantize: str | None) -> Call:
    rop = ReduceOp.parse(op)
    check_tag(tag)
    if quantize not in (None, "uint8"):
        raise ValueError(f"quantize must be None or 'uint8', got {quantize!r}")
    src = as_buffer(x, "input", writable=out is None)
    if quantize and src.dtype_name != "float32":
        raise ValueError(f"quantize='uint8' takes float32 tensors, not {src.dtype_name}")
    dst: Buffer | None = None
    if out is not None:
        dst = as_buffer(out, "out", writable=True)
        if dst.dtype_code != src.dtype_code or dst.count != src.count:
            raise ValueError(f"out has {dst.count} x {dst.dtype_name} but the input has {src.count} x {src.dtype_name}")
        if dst.overlaps(src):
            raise ValueError("out overlaps the input; pass out=None for an in-place all-reduce")
    kind = _core.Collective.ALL_REDUCE_Q8 if quantize else _core.Collective.ALL_REDUCE
    return Call(kind, src, dst, rop, 0)


def pair_call(kind: Any, x: Any, out: Any, op: ReduceOp | str, tag: int, root: int) -> Call:
    """A reduce-scatter / all-gather / broadcast call."""
    rop = ReduceOp.parse(op)
    check_tag(tag)
    name = COLLECTIVE_NAMES[kind]
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
    return Call(kind, src, dst, rop, root)


def check_for_epoch(call: Call, n: int) -> None:
    """Shapes that depend on the world size of the op's epoch."""
    src, dst = call.src, call.dst
    if call.kind == _core.Collective.REDUCE_SCATTER and (dst is None or src.count != dst.count * n):
        raise ValueError(f"reduce_scatter: the input must have world_size ({n}) x {dst.count if dst else '?'} "
                         f"elements, it has {src.count}")
    if call.kind == _core.Collective.ALL_GATHER and (dst is None or dst.count != src.count * n):
        raise ValueError(f"all_gather: the output must have world_size ({n}) x {src.count} elements, "
                         f"it has {dst.count if dst else '?'}")
    if call.kind == _core.Collective.BROADCAST and call.root >= n:
        raise ValueError(f"broadcast root {call.root} is not a rank of a world of {n}")


class WorkBuffers:
    """Where one op's ring writes, and how its result reaches the caller.

    All-reduce and reduce-scatter run in a scratch buffer (or in ``out``,
    which nobody reads before the op returns); :meth:`commit` copies the
    result into the caller's buffer once the master committed the op.
    All-gather writes its output directly (it is not an input); broadcast is
    in place (only the root's buffer is an input, and the root's bytes are
    what everyone ends with).
    """

    def __init__(self, call: Call, scratch: ScratchPool) -> None:
        self._call = call
        self._pool = scratch
        self.scratch: np.ndarray | None = None
        src, dst = call.src, call.dst
        self.count = src.count
        if call.kind in (_core.Collective.ALL_REDUCE, _core.Collective.ALL_REDUCE_Q8) and dst is not None:
            self.ptr = dst.ptr
        elif call.kind in (_core.Collective.ALL_REDUCE, _core.Collective.ALL_REDUCE_Q8,
                           _core.Collective.REDUCE_SCATTER):
            self.scratch = scratch.get(src.nbytes)
            self.ptr = self.scratch.ctypes.data
        elif call.kind == _core.Collective.ALL_GATHER:
            assert dst is not None
            self.ptr, self.count = dst.ptr, dst.count
        else:
            self.ptr = src.ptr

    def commit(self, rank: int) -> None:
        """The op was committed: only now may the caller's buffers change."""
        call, src, dst = self._call, self._call.src, self._call.dst
        if call.kind in (_core.Collective.ALL_REDUCE, _core.Collective.ALL_REDUCE_Q8) and self.scratch is not None:
            _core.copy(src.ptr, self.ptr, src.nbytes)
        elif call.kind == _core.Collective.REDUCE_SCATTER:
            assert dst is not None
            _core.copy(dst.ptr, self.ptr + rank * dst.nbytes, dst.nbytes)

    def release(self) -> None:
        if self.scratch is not None:
            self._pool.put(self.scratch)
            self.scratch = None


def launch(dp: _core.DataPlane, call: Call, bufs: WorkBuffers, epoch: EpochView, tag: int, seq: int,
           two_level: str) -> tuple[_core.FailKind, str, int, int, bool]:
    """Run the call's data-plane part: (FailKind, message, tx, rx, two-level?).
    A plain all-reduce goes two-level when the epoch allows and ``two_level``
    says so (:func:`pyccl.peer.hierarchy.use_two_level`), else over the ring."""
    if use_two_level(two_level, epoch.two_level, call.kind == _core.Collective.ALL_REDUCE, call.src.nbytes):
        return (*dp.all_reduce_two_level(epoch.number, tag, seq, call.src.ptr, bufs.ptr, bufs.count,
                                         call.src.dtype_code, int(call.rop)), True)
    return (*dp.collective(call.kind, call.root, epoch.number, tag, seq, call.src.ptr, bufs.ptr,
                           bufs.count, call.src.dtype_code, int(call.rop)), False)
