"""SharedState: named tensors that every member of a group holds bit-identically.

The keys, dtypes and shapes are the contract between peers; the bytes are
kept identical by ``Communicator.sync_shared_state`` (see docs/architecture.md,
"Shared state"). The tensors are the caller's own arrays: a sync writes into
them in place, so keep using the same objects across steps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pyccl import _core
from pyccl import protocol as P
from pyccl.protocol import STRATEGIES
from pyccl.types import Buffer, as_buffer

log = logging.getLogger("pyccl.shared_state")

__all__ = ["STRATEGIES", "SyncInfo", "KeyInfo", "SharedState", "content_hash", "fetch_planned"]


@dataclass(frozen=True)
class SyncInfo:
    """Result of a sync: the group's revision afterwards and what it cost this peer."""

    revision: int
    tx_bytes: int
    rx_bytes: int
    seconds: float


@dataclass(frozen=True)
class KeyInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    buffer: Buffer

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


class SharedState:
    """Named tensors plus an integer ``revision``.

    Args:
        tensors: name -> numpy array or torch CPU tensor (contiguous, any
            supported dtype). Names are at most 256 characters.
        revision: the revision these contents belong to. Increase it by
            exactly 1 after each deterministic update, before the next sync.
    """

    def __init__(self, tensors: Mapping[str, Any], revision: int = 0) -> None:
        if not isinstance(revision, int) or revision < 0:
            raise ValueError(f"revision must be a non-negative integer, got {revision!r}")
        self._tensors: dict[str, Any] = {}
        for name in sorted(tensors):
            if not isinstance(name, str) or not 0 < len(name) <= 256:
                raise ValueError(f"shared-state key {name!r} must be a non-empty string of at most 256 characters")
            as_buffer(tensors[name], f"shared-state key {name!r}", writable=True)  # validate now, not mid-sync
            self._tensors[name] = tensors[name]
        self.revision = revision

    def __getitem__(self, name: str) -> Any:
        return self._tensors[name]

    def __setitem__(self, name: str, value: Any) -> None:
        """Only in place: ``state["w"] -= lr * g`` works (the same array comes
        back); assigning another object copies its values into the existing
        tensor, whose key, dtype and shape are fixed."""
        current = self._tensors[name]
        if value is current:
            return
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"shared-state key {name!r} has shape {tuple(current.shape)}, not {tuple(value.shape)}")
        if as_buffer(current).dtype_code != as_buffer(value).dtype_code:
            raise ValueError(f"shared-state key {name!r} has dtype {current.dtype}, not {value.dtype}")
        current[...] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def items(self) -> list[tuple[str, Any]]:
        return list(self._tensors.items())

    def describe(self) -> list[KeyInfo]:
        """Keys in sync order (sorted by name) with their buffers."""
        out = []
        for name, t in self._tensors.items():
            buf = as_buffer(t, f"shared-state key {name!r}", writable=True)
            out.append(KeyInfo(name, buf.dtype_name, _shape_of(t), buf))
        return out

    def hashes(self) -> dict[str, int]:
        """64-bit content hash of every key (same value on every machine for the same bytes)."""
        return {k.name: content_hash(k.buffer) for k in self.describe()}

    def __repr__(self) -> str:
        return f"SharedState(keys={self.keys()}, revision={self.revision})"


def content_hash(buf: Buffer) -> int:
    return int(_core.content_hash(buf.ptr, buf.nbytes))


def fetch_planned(plan: P.SyncPlan, keys: list[KeyInfo], self_id: int, timeout: float,
                  credential: tuple[int, bytes] = (0, b"")) -> tuple[bool, str, int]:
    """Carry out a ``sync_plan``'s fetches into ``keys``' buffers.

    Pulls every listed key from all holders at once; the core verifies each
    key against the plan's hash as it arrives. ``credential``: (epoch, key)
    proving membership to the holders in a run with a secret. Returns (ok,
    reason, rx_bytes).
    """
    if not plan.fetch:
        return True, "", 0
    bad = [i for i, _ in plan.fetch if i >= len(keys)]
    if bad:
        return False, f"the sync plan names key index {bad[0]}, but this peer has {len(keys)} keys", 0
    holders = [(h.peer_id, h.host, h.port) for h in plan.holders if h.peer_id != self_id]
    targets = [(i, h, keys[i].buffer.ptr, keys[i].nbytes) for i, h in plan.fetch]
    epoch, key = credential
    kind, message, rx, key_index = _core.fetch_state(holders, targets, 2, 4 << 20, timeout, key, epoch)
    if kind != _core.FailKind.NONE:
        if key_index >= 0:  # the key whose bytes did not match the popular hash
            message = f"key {keys[key_index].name!r} {message}"
        return False, message, int(rx)
    log.info("peer %d fetched %d keys (%d bytes) from %d holders", self_id, len(plan.fetch), rx, len(holders))
    return True, "", int(rx)
