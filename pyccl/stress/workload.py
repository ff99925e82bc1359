"""The deterministic workload every stress peer runs, and its exact expected results.

Inputs are pure functions of ``(seed, revision, tag, peer id)``:

* a *pattern* ``P = pattern(seed, revision, tag, count)``: pseudo-random
  integers in ``[0, 2**bits)``, the same on every peer;
* peer ``p`` contributes ``P`` rotated left by ``shift(seed, revision, tag, p)``,
  so every element of every peer's input differs and a misplaced chunk, a
  contribution counted twice or dropped, or a stale buffer changes the result.

``bits`` is small enough that any reduction over up to ``max_world`` peers is
exact in the element type (float32: 24-bit mantissa, float16: 11 bits,
float64: 53 bits); integer sums simply wrap, in numpy exactly as in the core.
So the result of every completed all-reduce is known exactly from the op's
participants (``ReduceInfo.peers``), and it is compared bit for bit.

The revision is the group's shared-state revision after the step's sync, so
every participant of an op computes its input from the same revision.

The shared state is updated deterministically from the reduced results, so
every member that completed the same step holds the same bytes afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pyccl.stress.config import DTYPES

__all__ = [
    "Workload",
    "Mismatch",
    "mix64",
    "op_for_tag",
    "state_arrays",
    "update_state",
    "combined_state_hash",
    "array_hash",
]

_M64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """SplitMix64-style hash of a tuple of non-negative ints (stable across processes)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = (h ^ (v & _M64)) & _M64
        h = (h + 0x9E3779B97F4A7C15) & _M64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        h = z ^ (z >> 31)
    return h


def op_for_tag(op: str, tag: int) -> str:
    """The reduction used on ``tag``: ``op`` itself, or for ``mixed`` sum/max/min by tag."""
    if op == "mixed":
        return ("sum", "max", "min")[tag % 3]
    return op


def value_bits(dtype: np.dtype, max_world: int) -> int:
    """Bits per input value so that a reduction over ``max_world`` peers is exact."""
    mantissa = {np.dtype(np.float16): 11, np.dtype(np.float32): 24, np.dtype(np.float64): 53}.get(dtype)
    if mantissa is not None:
        return max(1, min(20, mantissa - math.ceil(math.log2(max(2, max_world)))))
    signed = dtype.kind == "i"
    return min(16, dtype.itemsize * 8 - (1 if signed else 0))


@dataclass(frozen=True)
class Mismatch:
    """A result that differs from the exact expected reduction."""

    index: int      # first differing element
    got: float | int
    expected: float | int
    bad_elements: int


class Workload:
    """Inputs and expected results for one (seed, dtype, count, op) configuration.

    ``max_world`` bounds the number of peers an op may have (exactness).
    Methods never allocate per call beyond the returned arrays.
    """

    def __init__(self, seed: int, dtype: str, count: int, op: str, max_world: int) -> None:
        if count <= 0:
            raise ValueError("count must be positive")
        self.seed = seed
        self.dtype = DTYPES[dtype]
        self.count = count
        self.op = op
        self.bits = value_bits(self.dtype, max_world)
        self._index = np.arange(count, dtype=np.uint32)
        self._acc_dtype = np.float64 if self.dtype.kind == "f" else np.int64

    def pattern(self, revision: int, tag: int) -> np.ndarray:
        """The common pattern of (revision, tag), in the element dtype."""
        salt = np.uint32(mix64(self.seed, revision, tag, 0x5EED) & 0xFFFFFFFF)
        with np.errstate(over="ignore"):
            v = (self._index + salt) * np.uint32(0x9E3779B1)
            v ^= v >> np.uint32(15)
            v *= np.uint32(0x85EBCA77)
            v ^= v >> np.uint32(13)
        v &= np.uint32((1 << self.bits) - 1)
        out: np.ndarray = v.astype(self.dtype)
        return out

    def shift(self, revision: int, tag: int, peer_id: int) -> int:
        """How far peer ``peer_id`` rotates the pattern of (revision, tag)."""
        return mix64(self.seed, revision, tag, peer_id, 0x5417) % self.count

    def fill_input(self, out: np.ndarray, pattern: np.ndarray, revision: int, tag: int, peer_id: int) -> None:
        """Write peer ``peer_id``'s input for (revision, tag) into ``out``."""
        s = self.shift(revision, tag, peer_id)
        n = self.count
        out[: n - s] = pattern[s:]
        out[n - s :] = pattern[:s]

    def input_for(self, pattern: np.ndarray, revision: int, tag: int, peer_id: int) -> np.ndarray:
        out = np.empty(self.count, dtype=self.dtype)
        self.fill_input(out, pattern, revision, tag, peer_id)
        return out

    def expected(self, pattern: np.ndarray, revision: int, tag: int, peers: Sequence[int]) -> np.ndarray:
        """The exact reduction over ``peers``' inputs for (revision, tag)."""
        op = op_for_tag(self.op, tag)
        n = self.count
        if op == "sum":
            acc = np.zeros(n, dtype=self._acc_dtype)
            wide = pattern.astype(self._acc_dtype)
            for p in peers:
                s = self.shift(revision, tag, p)
                np.add(acc[: n - s], wide[s:], out=acc[: n - s])
                np.add(acc[n - s :], wide[:s], out=acc[n - s :])
            return acc.astype(self.dtype)  # exact for floats; wraps like the core for ints
        fold = np.maximum if op == "max" else np.minimum
        out = self.input_for(pattern, revision, tag, peers[0])
        for p in peers[1:]:
            s = self.shift(revision, tag, p)
            fold(out[: n - s], pattern[s:], out=out[: n - s])
            fold(out[n - s :], pattern[:s], out=out[n - s :])
        return out

    @staticmethod
    def compare(got: np.ndarray, expected: np.ndarray) -> Mismatch | None:
        """``None`` if ``got`` is bit-identical to ``expected``, else where it differs."""
        a = got.view(np.uint8)
        b = expected.view(np.uint8)
        if np.array_equal(a, b):
            return None
        bad = np.flatnonzero(got.view(_same_size_uint(got.dtype)) != expected.view(_same_size_uint(got.dtype)))
        i = int(bad[0])
        return Mismatch(i, got[i].item(), expected[i].item(), int(bad.size))


def _same_size_uint(dtype: np.dtype) -> type:
    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]


# ------------------------------------------------------------------- shared state


def state_arrays(state_bytes: int) -> dict[str, np.ndarray]:
    """Fresh (all-zero) shared-state tensors: ``params`` and ``meta`` (int64[4]).

    ``params`` is int64 (the core has no uint64); the update does its
    wrapping arithmetic on a uint64 view of it."""
    return {
        "params": np.zeros(max(1, state_bytes // 8), dtype=np.int64),
        "meta": np.zeros(4, dtype=np.int64),
    }


def update_state(
    params: np.ndarray, meta: np.ndarray, revision: int, peers: Sequence[int], results: Sequence[np.ndarray]
) -> None:
    """The deterministic step update, in place: a function of the old state,
    the revision, the op's participants and every reduced result."""
    params = params.view(np.uint64)
    with np.errstate(over="ignore"):
        params *= np.uint64(0x5851F42D4C957F2D)
        params += np.uint64(revision + 1)
        for t, r in enumerate(results):
            k = min(params.size, r.size)
            params[:k] += r[:k].astype(np.int64).view(np.uint64) * np.uint64(2 * t + 1)
        params ^= params >> np.uint64(29)
    meta[0] = revision + 1
    meta[1] = len(peers)
    meta[2] = sum(peers)
    meta[3] += 1


def array_hash(a: np.ndarray) -> int:
    """64-bit content hash of an array (the core's XXH64-based block hash)."""
    from pyccl import _core

    a = np.ascontiguousarray(a)
    return int(_core.content_hash(a.ctypes.data, a.nbytes))


def combined_state_hash(hashes: dict[str, int]) -> int:
    """One 64-bit value for a SharedState's per-key hashes (order-independent of dict order)."""
    return mix64(*[v for _, v in sorted(hashes.items())])
