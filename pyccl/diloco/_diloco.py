"""The DiLoCo driver: inner steps, outer steps, joiners and failures.

See the package docstring (``pyccl/diloco/__init__.py``) for the algorithm
and the protocol; this module is its implementation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from pyccl.errors import CCLError, PeerFailure
from pyccl.peer.shared_state import SharedState, content_hash
from pyccl.types import as_buffer

from ._compress import ErrorFeedback
from ._eager import trial_step
from ._info import GatherSum, OuterStepInfo, merge
from ._layout import PinnedState, Slot, build_slots, dtype_name, initialize_state, make_outer_optimizer, sync_offsets
from ._options import resolve_options, trainable_parameters

log = logging.getLogger("pyccl.diloco")

#: All-reduce tags used by DiLoCo: TAG_BASE + slot index for the parameter
#: buffers, TAG_BASE + 2**16 + fragment for the contributor counts of delayed
#: mode. Keep other collectives of the same Communicator off this range.
TAG_BASE = 0x5D1C0000


class DiLoCo:
    """DiLoCo (Douillard et al., 2023) on a pyccl Communicator.

    Args:
        model: a ``torch.nn.Module`` on the CPU; its trainable parameters are
            the local copy that the inner optimizer trains.
        inner_optimizer: any torch optimizer over ``model.parameters()``
            (AdamW in the paper). Its state stays local to each peer.
        comm: a connected ``pyccl.Communicator``. A peer that joins a running
            group should ``connect()`` with a timeout longer than one outer
            step: it is admitted at the members' next outer step.
        sync_every: H, inner steps between two outer steps (of each fragment).
        outer_optimizer: ``callable(list_of_tensors) -> torch.optim.Optimizer``
            building the outer optimizer over the global parameter copies;
            default SGD(lr=0.7, momentum=0.9, nesterov=True).
        delayed: ``True`` (or ``"naive"``): one-step-delayed DiLoCo, the
            all-reduce of outer step k runs in the background during the next
            H inner steps and is applied at outer step k + 1. ``"eager"``:
            the same schedule with eager updates (Kale et al., 2025): each
            inner phase starts from a look-ahead outer step whose gradient
            stands in for the average still in flight: the other peers' last
            pseudo-gradients and this peer's fresh one (see ``_eager.py``).
            ``"lookahead"``: the same, with this peer's fresh pseudo-gradient
            alone as the stand-in. Both keep Nesterov momentum.
            ``"overlap"``: streaming DiLoCo's overlap, with
            ``sync_delay = H // max(2, F)`` and ``mixing="rebase"`` unless
            given: each fragment's all-reduce hides behind the inner steps
            until the next fragment's sync (H/2 with one fragment), the outer
            optimizer keeps Nesterov momentum. With ``fragments=4`` it is the
            measured choice (docs/diloco_compare.md, docs/diloco_compare_600.md).
        fragments: streaming DiLoCo: F fragments of the parameters (contiguous
            in model order, about equal size), fragment f synced at the inner
            steps where ``step % H == f * H // F``. 1 <= F <= H.
        sync_delay: streaming DiLoCo's overlap tau, in inner steps (0 <= tau
            < H, with ``delayed=False``): a fragment's all-reduce starts at its
            sync step and runs while the next tau inner steps compute; its
            average is applied tau steps later, and the fragment's local
            parameters are then mixed with the new global ones. ``delayed``
            is the tau = H case without mixing, so the two are exclusive.
        mixing: alpha of streaming DiLoCo, used with ``sync_delay > 0``
            (default 0.5, ``"rebase"`` with ``delayed="overlap"``):
            ``local = alpha * local + (1 - alpha) * global`` when the
            average lands (0: take the global parameters). ``"rebase"``:
            ``local = global + (local - local at the sync)``: the progress
            made since the sync is kept and moved onto the new global
            parameters, and the next pseudo-gradient is measured from the
            new global parameters, so no progress is lost or sent twice.
        quantize: compression of the float32 pseudo-gradients: ``"uint8"``
            (the core's quantized all-reduce, about 4x fewer bytes than
            float32) or ``"int4"`` (4-bit codes all-gathered and summed on
            every peer in rank order; per peer (n - 1) x N / 2 bytes instead
            of 2 (n - 1) / n x 4N). Other dtypes and the contributor counts
            are never quantized.
        error_feedback: with ``quantize``: keep a per-peer residual of what
            quantization lost and add it to the next pseudo-gradient (default
            True; a joiner starts with a zero residual).

    Loop: ``loss.backward(); dl.step()``. ``dl.step()`` runs the inner
    optimizer (and ``zero_grad``), counts the inner step and, when a fragment
    is due, does its outer step; it returns an :class:`OuterStepInfo` then,
    else None. Call ``dl.finish()`` on every peer at the same inner step to
    end training with the final global parameters in the model.

    Only trainable parameters are averaged and shared: frozen parameters
    and buffers (e.g. BatchNorm statistics) stay local, so give them the same
    values on every peer. The global copy has each parameter's own dtype
    (a bfloat16 model gets a bfloat16 outer step). Errors other than
    ``PeerFailure`` propagate: ``CCLError`` when this peer lost the group or
    a joiner's state transfer failed (every holder died: close the
    Communicator and join again), ``MismatchError`` (``"uint8"``) or
    ``ValueError`` (``"int4"``) when a quantized pseudo-gradient held NaN or
    Inf (training diverged).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        comm: Any,
        sync_every: int,
        outer_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
        delayed: bool | str = False,
        fragments: int = 1,
        quantize: str | None = None,
        sync_delay: int = 0,
        mixing: float | str | None = None,
        error_feedback: bool = True,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise TypeError(f"inner_optimizer must be a torch.optim.Optimizer, got {type(inner_optimizer).__name__}")
        opts = resolve_options(delayed, sync_every, fragments, sync_delay, mixing, quantize)
        self._qkw: dict[str, Any] = {"quantize": quantize} if quantize == "uint8" else {}
        if getattr(comm, "world_size", 0) < 1:
            raise CCLError("connect() the Communicator before creating DiLoCo")
        named = trainable_parameters(model)
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.comm = comm
        self.sync_every = sync_every
        mode = opts.mode
        self.mode = mode                  # "sync", "naive", "eager" or "stream"
        self.delayed = mode in ("naive", "eager")  # the one-step-delayed schedule
        self._own_proxy = opts.own_proxy  # the look-ahead uses this peer's pseudo-gradient alone
        self.fragments = fragments
        self.quantize = quantize
        self.sync_delay = sync_delay = opts.sync_delay
        self.rebase = opts.rebase
        self.mixing = opts.mixing
        self.error_feedback = bool(error_feedback)
        self._overlapped = mode != "sync"
        self.slots: list[list[Slot]] = build_slots(named, fragments, self._overlapped, eager=mode == "eager",
                                                   rebase=self.rebase)
        self._all_slots = [s for fr in self.slots for s in fr]
        if quantize is not None:
            for s in self._all_slots:
                if s.dtype == torch.float32:
                    s.ef = ErrorFeedback(quantize, s.numel, feedback=self.error_feedback)
        by_name = {name: view for s in self._all_slots for name, view in zip(s.names, s.glob.views)}
        self._names = [n for n, _ in named]
        self._global = [by_name[n] for n in self._names]  # model order
        fragment_of = {id(v): s.fragment for s in self._all_slots for v in s.glob.views}
        self.outer_optimizer = make_outer_optimizer(outer_optimizer, list(self._global))
        initialize_state(self.outer_optimizer)
        self._pinned = PinnedState(self.outer_optimizer, fragment_of)

        self._counters = torch.zeros(2, dtype=torch.int64)  # [inner steps, outer steps]
        tensors: dict[str, torch.Tensor] = {"diloco.counters": self._counters}
        for s in self._all_slots:
            tensors[f"diloco.f{s.fragment}.params.{dtype_name(s.dtype)}"] = s.glob.flat
        for key, (_, flat) in self._pinned.flats.items():
            tensors[f"diloco.{key}"] = flat.flat
        self._count_in = torch.zeros(fragments, dtype=torch.float32)
        self._pending_count = torch.zeros(fragments, dtype=torch.float32)
        if self._overlapped:
            # Sums of fragments other than 0 can be complete but not yet
            # applied when the state is synced (at fragment 0's outer step): a
            # joiner needs them to apply them when they are due, as the members do.
            tensors["diloco.pending_count"] = self._pending_count
            for s in self._all_slots:
                if s.fragment > 0:
                    assert s.out is not None
                    tensors[f"diloco.f{s.fragment}.pending.{dtype_name(s.dtype)}"] = s.out
        self.state = SharedState(tensors, revision=0)
        self._hash_keys = [k for k in self.state.keys() if ".pending" not in k]
        offsets = sync_offsets(sync_every, fragments)
        self._due = {off: f for f, off in enumerate(offsets)}
        self._land: dict[int, list[int]] = {}
        if mode == "stream":
            for f, off in enumerate(offsets):
                self._land.setdefault((off + sync_delay) % sync_every, []).append(f)
        self._handles: dict[int, list[Any]] = {}
        self._settled: dict[int, list[Any]] = {}
        self._finished = False
        self.inner_step = 0
        self.outer_step = 0
        self.join_info = self._join()

    # ------------------------------------------------------------ public API

    def step(self) -> OuterStepInfo | None:
        """``inner_optimizer.step()``, ``zero_grad()``, and the outer-step work
        due at this inner step: a fragment's outer step and, with a sync
        delay, the landing of a fragment's average."""
        if self._finished:
            raise CCLError("DiLoCo.finish() was called; create a new DiLoCo to train on")
        self.inner_optimizer.step()
        self.inner_optimizer.zero_grad(set_to_none=True)
        self.inner_step += 1
        r = self.inner_step % self.sync_every
        infos = [self._land_fragment(g) for g in self._land.get(r, ())]
        f = self._due.get(r)
        if f is not None:
            infos.append(self._outer(f))
        return merge(infos)

    def finish(self) -> None:
        """End training: apply the averages still in flight (delayed and
        streaming modes) and load the global parameters into the model,
        identically on every peer.

        A collective: every peer calls it at the same inner step (ideally a
        multiple of ``sync_every``: local progress since a fragment's last
        outer step is dropped). ``step()`` cannot be called afterwards.
        """
        if self._finished:
            return
        if self._overlapped:
            for f in range(self.fragments):
                self._settle(f)
                self._apply_pending(f)
        for f in range(self.fragments):
            self._reset_local(f, from_start=False)
        self._finished = True

    def close(self) -> None:
        """Wait for background all-reduces (ignoring their errors) without
        applying them; for a peer that leaves. Does not close ``comm``."""
        for hs in self._handles.values():
            for h in hs:
                try:
                    h.wait()
                except CCLError:
                    pass
        self._handles.clear()
        self._finished = True

    def global_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The global (outer) parameters in model order: views of the shared state."""
        return list(zip(self._names, self._global))

    def residuals(self) -> list[torch.Tensor]:
        """The error-feedback residuals of the float32 slots (local to this peer; empty without quantize)."""
        return [s.ef.residual for s in self._all_slots if s.ef is not None]

    def state_hash(self) -> int:
        """One 64-bit hash of the global parameters, the outer optimizer state
        and the counters (the shared state without pending sums, which an
        in-flight all-reduce may be writing). Equal on every peer after every
        outer step."""
        h = 0
        for k in self._hash_keys:
            h = (h * 1_000_003 + content_hash(as_buffer(self.state[k]))) & 0xFFFFFFFFFFFFFFFF
        return h

    # ------------------------------------------------------------ internals

    def _tag(self, s: Slot) -> int:
        return TAG_BASE + s.index

    def _q(self, s: Slot) -> dict[str, Any]:
        """quantize= for a slot's all-reduce: the core quantizes float32 only."""
        return self._qkw if s.dtype == torch.float32 else {}

    def _count_tag(self, f: int) -> int:
        return TAG_BASE + (1 << 16) + f

    @staticmethod
    def _int4(s: Slot) -> bool:
        return s.ef is not None and s.ef.packer is not None

    def _join(self) -> OuterStepInfo:
        """Enter the group's program at an outer-step boundary: admit anyone
        waiting, take the group's shared state, start from it."""
        t0 = time.perf_counter()
        admitted = self.comm.update_topology()
        sync = self.comm.sync_shared_state(self.state)
        self._load_counters()
        for f in range(self.fragments):
            self._reset_local(f, from_start=False)
        if self._overlapped and self.inner_step > 0:
            # The members started fragment 0's all-reduce right after this
            # sync; this peer has no pseudo-gradient for it, so it takes part
            # with zeros and a contributor count of 0.
            self._launch(0, contribute=False)
        if sync.rx_bytes:
            log.info("peer %d joined at inner step %d (revision %d): received %d bytes of DiLoCo state",
                     self.comm.peer_id, self.inner_step, self.state.revision, sync.rx_bytes)
        return OuterStepInfo(self.outer_step, 0, self.inner_step, self.state.revision, self.comm.world_size,
                             self.comm.peers, False, time.perf_counter() - t0, 0.0, sync.tx_bytes, sync.rx_bytes,
                             0, admitted, True, sync.tx_bytes)

    def _load_counters(self) -> None:
        self.inner_step = int(self._counters[0])
        self.outer_step = int(self._counters[1])

    def _outer(self, f: int) -> OuterStepInfo:
        t0 = time.perf_counter()
        infos: list[Any] = []
        retries = 0
        applied = False
        if self.mode == "sync":
            self._compute_pg(f)
            self._compress(f)
            infos, retries = self._reduce_now(f)
            self._apply(f)
            applied = True
        elif self.delayed:
            infos, retries = self._settle(f)
            if self.mode == "eager":
                self._proxy_begin(f)   # uses the previous input, before _compute_pg overwrites it
            self._compute_pg(f)        # against the start point, before the update below moves it
            if self.mode == "eager":
                self._proxy_end(f)
            applied = self._apply_pending(f)
        else:  # stream: the average lands sync_delay steps later (_land_fragment)
            self._compute_pg(f)
            if self.rebase:
                with torch.no_grad():
                    for s in self.slots[f]:
                        assert s.anchor is not None
                        torch.cat([p.detach().reshape(-1) for p in s.local], out=s.anchor)
        self.outer_step += 1
        self._counters[0] = self.inner_step
        self._counters[1] = self.outer_step
        admitted = synced = False
        state_tx = 0
        tx = sum(i.tx_bytes for i in infos)
        rx = sum(i.rx_bytes for i in infos)
        if f == 0:
            if self._overlapped:
                # update_topology() and the sync wait for this peer's
                # in-flight ops anyway; settle them here so that a failed one
                # is redone now, while its participants are all still here,
                # and the state holds valid pending sums.
                for g in range(1, self.fragments):
                    g_infos, g_retries = self._settle(g)
                    self._settled[g] = g_infos
                    retries += g_retries
            self.state.revision += 1
            admitted = self.comm.update_topology()
            sync = self.comm.sync_shared_state(self.state)
            if sync.rx_bytes:
                log.warning("peer %d's DiLoCo state differed from the group's at revision %d; took the group's",
                            self.comm.peer_id, sync.revision)
                self._load_counters()
            tx += sync.tx_bytes
            rx += sync.rx_bytes
            state_tx = sync.tx_bytes
            synced = True
        if self._overlapped:
            self._compress(f)
            self._launch(f, contribute=True)
        if self.mode == "eager":
            slots = self.slots[f]
            trial_step(self.outer_optimizer, self._pinned, f, slots, [s.proxy for s in slots],  # type: ignore[misc]
                       [s.start for s in slots])  # type: ignore[misc]
        if self.mode != "stream":
            self._reset_local(f, from_start=True)
        peers = infos[0].peers if infos else ()
        return OuterStepInfo(
            outer_step=self.outer_step, fragment=f, inner_step=self.inner_step, revision=self.state.revision,
            world_size=infos[0].world_size if infos else self.comm.world_size, peers=peers, applied=applied,
            seconds=time.perf_counter() - t0, reduce_seconds=max((i.seconds for i in infos), default=0.0),
            tx_bytes=tx, rx_bytes=rx, retries=retries, admitted=admitted, synced=synced, state_tx_bytes=state_tx,
        )

    def _land_fragment(self, f: int) -> OuterStepInfo:
        """Streaming with a sync delay: fragment f's average arrives; apply it
        and mix the fragment's local parameters with the new global ones."""
        t0 = time.perf_counter()
        infos, retries = self._settle(f)
        applied = self._apply_pending(f)
        if applied:
            self._mix_local(f)
        return OuterStepInfo(
            outer_step=self.outer_step, fragment=f, inner_step=self.inner_step, revision=self.state.revision,
            world_size=infos[0].world_size if infos else self.comm.world_size,
            peers=infos[0].peers if infos else (), applied=applied, seconds=time.perf_counter() - t0,
            reduce_seconds=max((i.seconds for i in infos), default=0.0), tx_bytes=sum(i.tx_bytes for i in infos),
            rx_bytes=sum(i.rx_bytes for i in infos), retries=retries, admitted=False, synced=False,
        )

    def _compute_pg(self, f: int) -> None:
        """pseudo-gradient = start point - local, into each slot's flat buffer
        (the start point is the global parameters, or eager mode's look-ahead)."""
        with torch.no_grad():
            for s in self.slots[f]:
                torch.cat([p.detach().reshape(-1) for p in s.local], out=s.pg)
                start = s.start if s.start is not None else s.glob.flat
                torch.sub(start, s.pg, out=s.pg)

    def _compress(self, f: int) -> None:
        """Error feedback (and 4-bit packing) of fragment f's float32 pseudo-gradients, once per outer step."""
        with torch.no_grad():
            for s in self.slots[f]:
                if s.ef is not None:
                    s.ef.prepare(s.pg)

    def _proxy_begin(self, f: int) -> None:
        """Eager: proxy = sum of the previous step - this peer's own part of it."""
        mine = float(self._count_in[f])
        with torch.no_grad():
            for s in self.slots[f]:
                assert s.proxy is not None and s.out is not None
                if float(self._pending_count[f]) > 0 and not self._own_proxy:
                    torch.sub(s.out, s.pg, alpha=mine, out=s.proxy)
                else:
                    s.proxy.zero_()

    def _proxy_end(self, f: int) -> None:
        """Eager: proxy = (others' previous + my fresh pseudo-gradient) / their number."""
        c = float(self._pending_count[f])
        n = (c - float(self._count_in[f]) + 1.0) if c > 0 and not self._own_proxy else 1.0
        with torch.no_grad():
            for s in self.slots[f]:
                assert s.proxy is not None
                s.proxy.add_(s.pg)
                if n != 1.0:
                    s.proxy.div_(n)

    def _reduce_sync(self, s: Slot, avg: bool) -> Any:
        """One slot's blocking reduce: in place into ``pg`` (avg) or into ``out`` (sum)."""
        into = s.pg if avg else s.out
        assert into is not None
        if self._int4(s):
            info, gathered = self._gather(s, lambda g: self.comm.all_gather(s.ef.packed, g, tag=self._tag(s)))
            ranks = s.ef.packer.sum_gathered(gathered, into)
            if avg:
                into.div_(float(ranks))
            return info
        if avg:
            return self.comm.all_reduce(s.pg, op="avg", tag=self._tag(s), **self._q(s))
        return self.comm.all_reduce(s.pg, out=s.out, op="sum", tag=self._tag(s), **self._q(s))

    def _gather(self, s: Slot, call: Callable[[torch.Tensor], Any]) -> tuple[Any, torch.Tensor]:
        """``call`` (an all_gather of the slot's packed bytes) into a buffer sized
        for the world. If the epoch changed between reading the world size and
        the call, the call raises ValueError before it takes its place in the
        sequence: size the buffer again and call again."""
        while True:
            n = self.comm.world_size
            gathered = torch.empty(n * s.ef.packer.nbytes, dtype=torch.uint8)
            try:
                return call(gathered), gathered
            except ValueError:
                if self.comm.world_size == n:
                    raise

    def _reduce_async(self, s: Slot) -> Any:
        if self._int4(s):
            h, gathered = self._gather(s, lambda g: self.comm.all_gather_async(s.ef.packed, g, tag=self._tag(s)))
            return GatherSum(h, gathered, s)
        return self.comm.all_reduce_async(s.pg, out=s.out, op="sum", tag=self._tag(s), **self._q(s))

    def _reduce_now(self, f: int) -> tuple[list[Any], int]:
        """Sync mode: average each slot in place; on PeerFailure (input
        untouched, world size already the new one) redo it over the survivors."""
        infos, retries = [], 0
        for s in self.slots[f]:
            while True:
                try:
                    infos.append(self._reduce_sync(s, avg=True))
                    break
                except PeerFailure as exc:
                    retries += 1
                    log.info("outer all-reduce of fragment %d failed (%s); retrying over %d peers",
                             f, exc, self.comm.world_size)
        return infos, retries

    def _launch(self, f: int, contribute: bool) -> None:
        """Overlapped modes: start the background sums of fragment f and of its
        contributor count (1 per peer that has a pseudo-gradient, 0 for a joiner)."""
        self._count_in[f] = 1.0 if contribute else 0.0
        if not contribute:
            for s in self.slots[f]:
                if s.ef is not None:
                    s.ef.contribute_nothing(s.pg)
                else:
                    s.pg.zero_()
        hs = [self._reduce_async(s) for s in self.slots[f]]
        hs.append(self.comm.all_reduce_async(self._count_in[f:f + 1], out=self._pending_count[f:f + 1], op="sum",
                                             tag=self._count_tag(f)))
        self._handles[f] = hs
        self._settled.pop(f, None)

    def _settle(self, f: int) -> tuple[list[Any], int]:
        """Overlapped modes: wait for fragment f's background all-reduces. If
        any failed, or they did not all run over the same peers, redo them all
        (out of place, so the inputs are intact) until they succeed together."""
        hs = self._handles.pop(f, None)
        if hs is None:
            return self._settled.pop(f, []), 0
        infos, failed = [], False
        for h in hs:
            try:
                infos.append(h.wait())
            except PeerFailure:
                failed = True
        retries = 0
        while failed or len({i.peers for i in infos}) != 1:
            retries += 1
            log.info("background all-reduce of fragment %d failed; redoing it over %d peers", f, self.comm.world_size)
            try:
                infos = [self._reduce_sync(s, avg=False) for s in self.slots[f]]
                infos.append(self.comm.all_reduce(self._count_in[f:f + 1], out=self._pending_count[f:f + 1],
                                                  op="sum", tag=self._count_tag(f)))
                failed = False
            except PeerFailure:
                failed = True
        return infos, retries

    def _apply_pending(self, f: int) -> bool:
        """Overlapped modes: average = sum / contributors, applied to fragment f."""
        c = float(self._pending_count[f])
        if c <= 0:
            return False
        with torch.no_grad():
            for s in self.slots[f]:
                assert s.out is not None
                s.out.div_(c)
        self._apply(f)
        self._pending_count[f] = 0.0
        return True

    def _apply(self, f: int) -> None:
        """One outer-optimizer step on fragment f's global parameters, with the
        averaged pseudo-gradient as their gradient (the others have none)."""
        views = [v for s in self.slots[f] for v in s.glob.views]
        with torch.no_grad():
            for s in self.slots[f]:
                for v, g in zip(s.glob.views, s.grads):
                    v.grad = g
            try:
                self.outer_optimizer.step()
            finally:
                for v in views:
                    v.grad = None
        self._pinned.repin()

    def _reset_local(self, f: int, from_start: bool) -> None:
        """local <- the global parameters (eager mode with ``from_start``: this peer's look-ahead start point)."""
        with torch.no_grad():
            for s in self.slots[f]:
                if s.start is not None and not from_start:
                    s.start.copy_(s.glob.flat)
                if s.anchor is not None:
                    s.anchor.copy_(s.glob.flat)
                src = s.glob.views if s.start is None else s.glob.views_of(s.start)
                for p, v in zip(s.local, src):
                    p.copy_(v)

    def _mix_local(self, f: int) -> None:
        """Streaming: local <- mixing * local + (1 - mixing) * global (mixing 0:
        a copy); rebase: local <- (local - anchor) + global, start <- global."""
        a = self.mixing
        with torch.no_grad():
            if self.rebase:
                for s in self.slots[f]:
                    assert s.anchor is not None and s.start is not None
                    for p, v, anc in zip(s.local, s.glob.views, s.glob.views_of(s.anchor)):
                        p.sub_(anc).add_(v)
                    s.start.copy_(s.glob.flat)
                return
            for s in self.slots[f]:
                for p, v in zip(s.local, s.glob.views):
                    if a == 0.0:
                        p.copy_(v)
                    else:
                        p.mul_(a).add_(v, alpha=1.0 - a)

    def __repr__(self) -> str:
        n = sum(s.numel for s in self._all_slots)
        return (f"DiLoCo(params={n}, sync_every={self.sync_every}, fragments={self.fragments}, mode={self.mode!r}, "
                f"sync_delay={self.sync_delay}, quantize={self.quantize!r}, inner_step={self.inner_step}, "
                f"revision={self.state.revision})")
