"""What an outer step reports (:class:`OuterStepInfo`), and the handle of a
4-bit all-gather that decodes and sums on ``wait()``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ._layout import Slot


@dataclass(frozen=True)
class OuterStepInfo:
    """What one outer step (of one fragment) did; returned by ``DiLoCo.step()``.

    ``peers``/``world_size`` describe the all-reduce whose average was applied
    at this step: this step's own in sync mode, the one started one outer step
    earlier in delayed mode, the one started ``sync_delay`` inner steps
    earlier in streaming mode with a sync delay (empty if none was applied
    or this peer received it through the shared state as a joiner). With a
    sync delay, an inner step where one fragment's average lands and
    another fragment is synced returns one info for both (``fragment`` is
    the synced one; bytes, seconds and retries are summed).
    """

    outer_step: int          # outer steps (fragment syncs) the group has done, this one included
    fragment: int
    inner_step: int
    revision: int            # the shared-state revision after this step
    world_size: int
    peers: tuple[int, ...]
    applied: bool            # an averaged pseudo-gradient was applied to the global parameters
    seconds: float           # time this step blocked training (everything outside the inner optimizer)
    reduce_seconds: float    # how long the applied all-reduce took (in the background, in delayed mode)
    tx_bytes: int
    rx_bytes: int
    retries: int             # all-reduce attempts that failed with PeerFailure and were redone
    admitted: bool           # update_topology() admitted joiners at this step
    synced: bool             # the shared state was synced at this step
    state_tx_bytes: int = 0  # the part of tx_bytes that was the shared-state sync (a joiner's transfer)


class GatherSum:
    """Handle of a 4-bit all-gather: ``wait()`` decodes every rank's bytes
    and sums them, in rank order, into the slot's output."""

    def __init__(self, handle: Any, gathered: torch.Tensor, slot: Slot) -> None:
        self._handle = handle
        self._gathered = gathered
        self._slot = slot

    def wait(self, timeout: float | None = None) -> Any:
        info = self._handle.wait(timeout)
        assert self._slot.out is not None and self._slot.ef is not None and self._slot.ef.packer is not None
        self._slot.ef.packer.sum_gathered(self._gathered, self._slot.out)
        return info


def merge(infos: list[OuterStepInfo]) -> OuterStepInfo | None:
    if not infos:
        return None
    base = infos[-1]
    if len(infos) == 1:
        return base
    applied = [i for i in infos if i.applied]
    src = applied[0] if applied else base
    return dataclasses.replace(
        base, peers=src.peers, world_size=src.world_size, applied=bool(applied),
        seconds=sum(i.seconds for i in infos), reduce_seconds=max(i.reduce_seconds for i in infos),
        tx_bytes=sum(i.tx_bytes for i in infos), rx_bytes=sum(i.rx_bytes for i in infos),
        retries=sum(i.retries for i in infos), state_tx_bytes=sum(i.state_tx_bytes for i in infos),
    )
