"""``ProcessGroupPyccl``: a torch.distributed ProcessGroup over pyccl.

Every torch entry point (current and legacy names) turns into one
:class:`~pyccl.torch._work.PendingOp` made of parts:

* ring collectives of the C++ core (``all_reduce``, ``reduce_scatter``,
  ``all_gather``, ``broadcast``), issued with the Communicator's ``*_async``
  calls under the group's issue lock, so every rank gives them the same
  sequence numbers in the same order whatever threads torch calls from;
* point-to-point transfers on the side channel (``send``/``recv``,
  all-to-all);
* earlier ops (a barrier waits for everything issued before it).

Inputs are never written before an op is committed (the core's guarantee);
staging buffers (non-contiguous tensors, PREMUL_SUM products, coalesced
flats, list-form all-gather/reduce-scatter) live in the op until it is over
(TORCH_NOTES pitfall 3) and results are copied out on the completion thread.

Failure: an op that fails because the group lost a member (the core raises
``PeerFailure``, or the op ran after the membership changed) fails its Work
with a :class:`BackendError` naming pyccl and the lost ranks, and marks the
group broken: every later call raises at once. A torch process group has a
fixed membership, so there is no retry: destroy it and re-initialise.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import (
    AllgatherOptions,
    AllreduceCoalescedOptions,
    AllreduceOptions,
    AllToAllOptions,
    BarrierOptions,
    BroadcastOptions,
    GatherOptions,
    ReduceOptions,
    ReduceScatterOptions,
    ScatterOptions,
)

import pyccl
from pyccl.errors import CCLError, MismatchError, PeerFailure
from pyccl.torch import _ops, _p2p
from pyccl.torch._rendezvous import (
    RUNTIME,
    Options,
    local_ip_towards,
    master_bind,
    random_base,
    store_get_str,
)
from pyccl.torch._monitored_barrier import monitored_barrier
from pyccl.torch._watchdog import Watchdog
from pyccl.torch._work import BackendError, Completer, PendingOp, PycclWork, Runner, seconds

log = logging.getLogger("pyccl.torch")

RedOpType = dist.ReduceOp.RedOpType


def _comm_lost(comm: Any) -> str | None:
    """Why the Communicator left its group (master gone, expelled), or None."""
    if comm is None:
        return None
    lost = getattr(type(comm), "lost", None)
    return comm.lost if lost is not None else getattr(comm, "_lost", None)  # (older cores: no public property)


def _is_sync(opts: Any) -> bool:
    return opts is not None and getattr(opts, "asyncOp", True) is False


def _single(tensors: Any, what: str) -> torch.Tensor:
    if isinstance(tensors, torch.Tensor):
        return tensors
    if len(tensors) != 1:
        raise ValueError(f"pyccl: {what} takes exactly one tensor per call (one device per process), got {len(tensors)}")
    return tensors[0]


def _check_cpu(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu":
            raise BackendError(
                f"pyccl: tensor on {t.device} is not supported: this pyccl build has no CUDA/accelerator path "
                "(the core moves CPU memory only); move the tensor to the CPU or use backend='nccl' for it"
            )
        if t.is_sparse:
            raise BackendError("pyccl: sparse tensors are supported by allreduce (SUM) only, as in gloo")


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + a.numel() * a.element_size()
    b1 = b0 + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


def _opt(opts: Any, cls: type) -> Any:
    """Accept an options object, a bare ReduceOp / RedOpType (legacy call forms), or None."""
    if opts is None:
        return cls()
    if isinstance(opts, cls):
        return opts
    if isinstance(opts, (dist.ReduceOp, RedOpType)):
        o = cls()
        o.reduceOp = opts if isinstance(opts, dist.ReduceOp) else dist.ReduceOp(opts)
        return o
    return opts


class ProcessGroupPyccl(dist.ProcessGroup):
    """A torch ProcessGroup whose collectives run on a pyccl Communicator."""

    def __init__(
        self,
        store: Any,
        rank: int,
        size: int,
        timeout: Any,
        group_name: str,
        global_ranks: Sequence[int],
        options: Options,
    ) -> None:
        super().__init__(rank, size)
        self._rank = rank
        self._size = size
        self._group_name = group_name
        self._group_desc = ""
        self._store = store
        self._options = options
        self._timeout = seconds(timeout, 1800.0)
        self._is_default = len(global_ranks) == 0
        self._global_ranks = list(global_ranks) if global_ranks else list(range(size))
        self._issue_lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._broken: str | None = None
        self._lost_at_break: list[int] = []
        self._owns_master_group = False  # this group's rank 0 started its master
        self._master_host: int | None = None
        self._closed = False
        self._inflight: dict[int, PendingOp] = {}
        self._a2a_seq = 0
        self._coalescing: list[PycclWork] | None = None
        self._comm: Any = None
        self._master: Any = None  # a pyccl.Master this group started
        self._master_address = ""
        self._endpoint: _p2p.Endpoint | None = None
        self._peers: tuple[int, ...] = ()
        self._epoch_ok = -1
        self._incarnation = 0
        self._timed_out: tuple[PendingOp, str] | None = None  # the op that timed out, and the error
        self._completer = Completer(group_name, self._translate)
        self._runner = Runner(group_name, self._completer)
        self._watchdog: Watchdog[PendingOp] = Watchdog(group_name, self._on_timeout)
        try:
            self._rendezvous()
        except BaseException:
            self._close(handshake=False)
            raise
        RUNTIME.groups.add(self)

    # ============================================================ rendezvous

    def _key(self, name: str) -> str:
        """Store key of this group's incarnation (a store may outlive a destroyed group)."""
        return f"pyccl/{self._incarnation}/{name}"

    def _rendezvous(self) -> None:
        opts, store, rank = self._options, self._store, self._rank
        # Every rank counts its own incarnations on this store: the same
        # number on every rank, and fresh keys after a destroy + re-init.
        self._incarnation = int(store.add(f"pyccl/incarnation/{rank}", 1))
        limit = opts.connect_timeout or min(self._timeout, 600.0)
        deadline = time.monotonic() + limit
        left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
        with RUNTIME.lock:
            shared_master = RUNTIME.default_master if not self._is_default else None
            shared_store = RUNTIME.default_store if not self._is_default else None
            shared_prefix = RUNTIME.default_prefix
            base = RUNTIME.default_pg_base
        self._owns_master_group = not opts.master and not shared_master
        # Global rank whose process runs the master (None: an external one).
        self._master_host = None if opts.master else (0 if shared_master else self._global_ranks[0])
        if opts.master:
            address = opts.master
        elif shared_master:
            address = shared_master
        elif rank == 0:
            bind, advertise = master_bind(opts, store)
            self._master = pyccl.Master(host=bind, port=0, heartbeat_timeout=opts.heartbeat_timeout).start()
            address = f"{advertise}:{self._master.port}"
        else:
            address = None
        if rank == 0:
            if self._is_default or not shared_master:
                base = random_base() if opts.master else 0
                pgid = base
            else:
                pgid = base + int(shared_store.add(f"{shared_prefix}/peer_groups", 1))
            store.set(self._key("master"), address)
            store.set(self._key("peer_group"), str(pgid))
            store.set(self._key("base"), str(base))
        address = store_get_str(store, self._key("master"), left())
        pgid = int(store_get_str(store, self._key("peer_group"), left()))
        if self._is_default:
            base = int(store_get_str(store, self._key("base"), left()))
            with RUNTIME.lock:
                RUNTIME.default_master = address
                RUNTIME.default_store = store
                RUNTIME.default_prefix = self._key("")[:-1]
                RUNTIME.default_pg_base = base
        self._master_address = address
        self._peer_group = pgid

        # Point-to-point endpoint before the ring: once a peer is in the ring
        # it may send to us.
        hub = RUNTIME.ensure_hub(local_ip_towards(address))
        store.set(self._key(f"p2p/{rank}"), hub.address)
        self._endpoint = _p2p.Endpoint(
            hub, self._group_name, rank, lambda r: store_get_str(store, self._key(f"p2p/{r}"), 60.0), self._health
        )
        hub.register(self._endpoint)

        comm = pyccl.Communicator(
            address,
            peer_group=pgid,
            connections=opts.connections or 4,
            name=f"torch:{self._group_name}:{rank}",
            order=rank,
        )
        self._comm = comm
        comm.connect(timeout=left())
        while comm.world_size < self._size:
            if time.monotonic() > deadline:
                raise BackendError(
                    f"pyccl: process group '{self._group_name}' did not form within {limit:.0f} s: "
                    f"{comm.world_size} of {self._size} ranks joined"
                )
            if not comm.update_topology():
                time.sleep(0.002)
        if comm.world_size != self._size or comm.rank != rank:
            raise BackendError(
                f"pyccl: process group '{self._group_name}' formed wrongly: world size {comm.world_size} "
                f"(expected {self._size}), ring rank {comm.rank} (expected {rank})"
            )
        self._peers = tuple(comm.peers)
        self._epoch_ok = comm.epoch
        log.info("pyccl: process group '%s' rank %d of %d ready (peer group %d, master %s)",
                 self._group_name, rank, self._size, pgid, address)

    # ============================================================== identity

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return "pyccl"

    def _get_backend_name(self) -> str:
        return "pyccl"

    @property
    def group_name(self) -> str:
        return self._group_name

    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    @property
    def group_desc(self) -> str:
        return self._group_desc

    def _set_group_desc(self, desc: str) -> None:
        self._group_desc = desc

    def name(self) -> str:
        return "pyccl"

    @property
    def _device_types(self) -> list[torch.device]:
        """The devices this backend serves, as gloo's group reports them:
        torch's state-dict, checkpoint and object-collective helpers pick
        their staging device from this list."""
        return [torch.device("cpu")]

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def getRank(self) -> int:  # noqa: N802
        return self._rank

    def getSize(self) -> int:  # noqa: N802
        return self._size

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = seconds(timeout, self._timeout)

    @property
    def communicator(self) -> Any:
        """The underlying :class:`pyccl.Communicator`."""
        return self._comm

    def __repr__(self) -> str:
        return f"ProcessGroupPyccl(group={self._group_name!r}, rank={self._rank}, size={self._size})"

    # ======================================================== health, errors

    def _lost_ranks(self) -> list[int]:
        comm = self._comm
        if comm is None:
            return []
        now = set(comm.peers)
        return [r for r, pid in enumerate(self._peers) if pid not in now]

    def _describe_lost(self) -> str:
        lost = self._lost_ranks()
        comm = self._comm
        master_gone = _comm_lost(comm)
        if lost:
            globs = [self._global_ranks[r] for r in lost]
            who = ", ".join(f"rank {r}" + (f" (global rank {g})" if g != r else "") for r, g in zip(lost, globs))
            return f"lost peer {who}: it died or stopped responding"
        if master_gone:
            if self._master_host is None:
                return f"lost the pyccl master at {self._master_address} ({master_gone})"
            return (f"lost peer global rank {self._master_host}, which hosted the pyccl master at "
                    f"{self._master_address}: it died or stopped responding ({master_gone})")
        return ""

    def _health(self) -> str | None:
        """None while the group is whole; else why not (for the p2p monitor)."""
        if self._broken:
            return self._broken
        if self._closed:
            return f"pyccl: process group '{self._group_name}' was shut down"
        comm = self._comm
        if comm is not None and comm.epoch == self._epoch_ok and not _comm_lost(comm):
            return None  # fast path: no epoch change since the last check
        why = self._describe_lost()
        if why:
            self._mark_broken(why)
            return self._broken
        if comm is not None:
            self._epoch_ok = comm.epoch  # a new epoch with the same members (e.g. after a mismatch)
        return None

    def _mark_broken(self, why: str) -> None:
        self._break(f"pyccl: process group '{self._group_name}' (rank {self._rank} of {self._size}) {why}")

    def _break(self, message: str) -> bool:
        """Mark the group unusable with ``message``; False if it already was."""
        lost = self._lost_ranks()
        with self._state_lock:
            if self._broken is not None:
                return False
            self._lost_at_break = lost
            self._broken = message
        log.error("%s", message)
        return True

    def _on_timeout(self, op: PendingOp, timeout: float) -> None:
        """Watchdog thread: ``op`` outlived its timeout. Fail it with a timeout
        error and abort the group (as gloo does, the group cannot be trusted
        afterwards: some rank is elsewhere in the program): leaving the pyccl
        group releases the core ops blocked on the missing rank, and the
        other ranks see this one leave and fail their ops too."""
        which = "the call's" if timeout != self._timeout else "the process group's"
        message = (f"pyccl: {op.name} on process group '{self._group_name}' (rank {self._rank} of {self._size}) "
                   f"Timed out after {timeout:g} s ({which} timeout): a rank did not call it or is stuck; "
                   "the group is aborted: destroy it and re-initialise")
        self._timed_out = (op, message)
        if not self._break(message):
            return
        comm = self._comm
        if comm is not None:
            comm.close()
        if self._endpoint is not None:
            self._endpoint.fail_all(message)

    def _ensure_usable(self, name: str) -> None:
        if self._closed:
            raise BackendError(f"pyccl: {name} on process group '{self._group_name}' after it was shut down")
        why = self._health()
        if why:
            raise BackendError(f"{why}; {name} cannot run: destroy the process group and re-initialise")

    def _check_result(self, info: Any) -> BaseException | None:
        peers = getattr(info, "peers", None)
        if peers is not None and tuple(peers) and tuple(peers) != self._peers:
            self._mark_broken(self._describe_lost() or "the group's membership changed")
            return BackendError(str(self._broken))
        return None

    def _translate(self, op: PendingOp, exc: BaseException) -> BaseException:
        head = f"pyccl: {op.name} failed on process group '{self._group_name}' (rank {self._rank} of {self._size})"
        timed_out = self._timed_out
        if timed_out is not None:
            late, message = timed_out
            return BackendError(message if late is op else f"{head}: the group was aborted: {message}")
        if isinstance(exc, MismatchError):
            return BackendError(f"{head}: the ranks called it with different arguments: {exc}")
        if isinstance(exc, (PeerFailure, CCLError)):
            # PeerFailure: the new membership is already known (core guarantee).
            why = self._describe_lost()
            if why:
                self._mark_broken(why)
                detail = _core_reason(str(exc))
                return BackendError(f"{head}: {why}" + (f" [core: {detail}]" if detail and detail not in why else ""))
            if self._closed:
                return BackendError(f"{head}: the process group was shut down")
            return BackendError(f"{head}: {exc}")
        if isinstance(exc, RuntimeError) and str(exc).startswith("pyccl:"):
            return BackendError(str(exc))
        return BackendError(f"{head}: {type(exc).__name__}: {exc}")

    # ============================================================ machinery

    def _new_op(self, name: str, result: list[torch.Tensor] | None = None, opts: Any = None) -> PendingOp:
        """A new op; its timeout is the call's (``opts.timeout``, where torch
        sets one) or else the group's."""
        timeout = seconds(getattr(opts, "timeout", None), self._timeout)
        work = PycclWork(f"{name} on process group '{self._group_name}'", timeout, result, self._runner,
                         self._completer)
        return PendingOp(name, work, self._completer, check=self._check_result)

    def _launch(self, op: PendingOp, body: Callable[[PendingOp], None], sync: bool = False) -> PycclWork:
        """Issue ``op``'s parts under the issue lock; return its Work.

        ``sync``: the caller waits for the result right away (``async_op=False``
        in the dist API). If the op is only core collectives and the runner
        has nothing queued, it runs here on the caller's thread: same order,
        two thread hops less. Nobody holds its Work yet, so completing it here
        runs no user callback (pitfall 8 is about those)."""
        with self._issue_lock:
            self._ensure_usable(op.name)
            key = id(op)
            with self._state_lock:
                self._inflight[key] = op
            self._watchdog.watch(op, op.work.timeout)
            op.then(lambda: self._retire(key, op))
            try:
                with torch.no_grad():  # staging copies of parameters must not build graphs
                    body(op)
            except BaseException as exc:
                # Nothing (more) was issued: fail the op's work through the
                # completion path, and raise here as gloo does for bad args.
                op.issued(exc if isinstance(exc, (BackendError, CCLError)) else BackendError(f"pyccl: {op.name}: {exc}"))
                if isinstance(exc, (ValueError, TypeError)) and not str(exc).startswith("pyccl:"):
                    raise ValueError(f"pyccl: {op.name}: {exc}") from exc
                raise
            # The runner's part is the op's last one (unless p2p parts are still
            # out), so the runner completes the op itself, without a hop.
            has_calls = bool(op.calls)
            if has_calls and sync and op.only_issue_part() and self._runner.idle():
                op.inline_thread = threading.current_thread()
                op.add_part()
                op.issued()
                op.run_calls()  # completes the op on this thread
            else:
                if has_calls:
                    op.add_part()
                op.issued()
                if has_calls:
                    self._runner.submit(op)
            if self._coalescing is not None:
                self._coalescing.append(op.work)
        return op.work

    def _retire(self, key: int, op: PendingOp) -> None:
        self._watchdog.unwatch(op)
        with self._state_lock:
            self._inflight.pop(key, None)

    def _core(self, pending: PendingOp, kind: str, *args: Any, **kwargs: Any) -> None:
        """Add a core collective (``kind``: all_reduce, reduce_scatter, all_gather,
        broadcast) to the op; the runner calls it in issue order."""
        fn = getattr(self._comm, kind)
        pending.calls.append(lambda: fn(*args, **kwargs))

    @staticmethod
    def _contig(op: PendingOp, t: torch.Tensor, copy_in: bool = True, copy_back: bool = True) -> torch.Tensor:
        """A contiguous tensor with ``t``'s values; copies back into ``t`` at the end if it had to stage."""
        if t.is_contiguous():
            return t
        staged = t.contiguous() if copy_in else torch.empty(t.shape, dtype=t.dtype)
        op.keep.append(staged)
        if copy_back:
            _add_finish(op, lambda: t.copy_(staged))
        return staged

    # --------------------------------------------------------- reduction core

    def _reduce_into(self, op: PendingOp, src: torch.Tensor, dst: torch.Tensor | None, rop: Any) -> None:
        """All-reduce contiguous ``src`` into ``dst`` (None: in place)."""
        plan = _ops.reduction_plan(rop, src.dtype)
        target = src if dst is None else dst
        if plan.gather_reduce is not None:
            gathered = torch.empty((self._size,) + tuple(src.shape), dtype=src.dtype)
            op.keep += [src, gathered]
            self._core(op, "all_gather", _ops.byte_view(src), _ops.byte_view(gathered))
            reducer, divide, n = plan.gather_reduce, plan.avg_divisor is not None, self._size

            def fin() -> None:
                res = reducer(gathered)
                if divide:
                    res = res / n
                target.copy_(res)

            _add_finish(op, fin)
            return
        if plan.premul is not None:
            staged = src * plan.premul
            if staged.dtype != src.dtype:
                staged = staged.to(src.dtype)
            op.keep += [staged, target]
            self._core(op, "all_reduce", plan.view(staged), out=plan.view(target), op=plan.core_op)
            return
        op.keep.append(target)
        if dst is None:
            self._core(op, "all_reduce", plan.view(src), op=plan.core_op)
        else:
            op.keep.append(src)
            self._core(op, "all_reduce", plan.view(src), out=plan.view(dst), op=plan.core_op)

    def _reduce_scatter_into(self, op: PendingOp, flat: torch.Tensor, out: torch.Tensor, rop: Any) -> None:
        """Reduce-scatter contiguous ``flat`` (size x out.numel elements) into contiguous ``out``."""
        plan = _ops.reduction_plan(rop, flat.dtype)
        if plan.gather_reduce is not None:
            # The core's reduce-scatter needs a reducible dtype; else all-reduce a copy and slice.
            tmp = torch.empty_like(flat)
            self._reduce_into(op, flat, tmp, rop)
            m, r = out.numel(), self._rank
            op.keep += [tmp, out]
            _add_finish(op, lambda: out.view(-1).copy_(tmp.view(-1)[r * m:(r + 1) * m]))
            return
        if plan.premul is not None:
            staged = flat * plan.premul
            flat = staged if staged.dtype == flat.dtype else staged.to(flat.dtype)
        elif _overlaps(flat, out):
            flat = flat.clone()
        op.keep += [flat, out]
        self._core(op, "reduce_scatter", plan.view(flat), plan.view(out), op=plan.core_op)

    # ============================================================ collectives

    def allreduce(self, tensors: Any, opts: Any = None) -> PycclWork:
        opts = _opt(opts, AllreduceOptions)
        t = _single(tensors, "allreduce")
        if t.is_sparse:
            return self._sparse_allreduce(t, opts)
        _check_cpu(t)
        op = self._new_op("allreduce", [t], opts)

        def body(op: PendingOp) -> None:
            x = self._contig(op, t)
            self._reduce_into(op, x, None, opts.reduceOp)

        return self._launch(op, body, sync=_is_sync(opts))

    def _sparse_allreduce(self, t: torch.Tensor, opts: Any) -> PycclWork:
        """gloo's sparse all-reduce: gather every rank's coalesced indices and
        values, add the ranks' tensors in rank order, coalesce; every rank
        gets the same tensor (what DDP needs for ``nn.Embedding(sparse=True)``)."""
        if t.device.type != "cpu":
            _check_cpu(t)
        if opts.reduceOp != dist.ReduceOp.SUM:
            raise ValueError("pyccl: allreduce of sparse tensors only works with ReduceOp.SUM (as in gloo)")
        op = self._new_op("allreduce (sparse)", [t], opts)
        comm, n = self._comm, self._size
        result: list[torch.Tensor] = []

        def gather_all() -> Any:
            local = t.detach().coalesce()
            dims = [local.sparse_dim(), local.dense_dim(), *local.shape]
            meta = torch.tensor([local._nnz(), len(dims), *dims], dtype=torch.int64)
            metas = torch.empty(n * meta.numel(), dtype=torch.int64)
            comm.all_gather(meta, metas)  # a rank with other dimensions: MismatchError (sizes differ)
            metas = metas.view(n, -1)
            if not bool((metas[:, 1:] == meta[1:]).all()):
                raise ValueError(f"pyccl: sparse allreduce: the ranks' tensors differ in shape or dimensions "
                                 f"(rank r: [nnz, ndims, sparse_dim, dense_dim, *shape] = {metas.tolist()})")
            nnz = metas[:, 0].tolist()
            width = max(nnz)
            indices = torch.zeros((local.sparse_dim(), width), dtype=torch.int64)
            indices[:, :nnz[self._rank]] = local.indices()
            values = torch.zeros((width, *local.values().shape[1:]), dtype=local.dtype)
            values[:nnz[self._rank]] = local.values()
            all_idx = torch.empty((n, *indices.shape), dtype=torch.int64)
            all_val = torch.empty((n, *values.shape), dtype=values.dtype)
            comm.all_gather(_ops.byte_view(indices), _ops.byte_view(all_idx))
            info = comm.all_gather(_ops.byte_view(values), _ops.byte_view(all_val))
            total = torch.sparse_coo_tensor(all_idx[0, :, :nnz[0]], all_val[0, :nnz[0]], local.shape)
            for r in range(1, n):
                total = total + torch.sparse_coo_tensor(all_idx[r, :, :nnz[r]], all_val[r, :nnz[r]], local.shape)
            result.append(total.coalesce())
            return info

        def body(op: PendingOp) -> None:
            op.keep.append(t)
            op.calls.append(gather_all)
            _add_finish(op, lambda: t.copy_(result[0]))

        return self._launch(op, body, sync=_is_sync(opts))

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> PycclWork:
        opts = _opt(opts, AllreduceCoalescedOptions)
        tensors = list(tensors)
        _check_cpu(*tensors)
        op = self._new_op("allreduce_coalesced", tensors, opts)

        def body(op: PendingOp) -> None:
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for t in tensors:
                by_dtype.setdefault(t.dtype, []).append(t)
            for dtype, group in by_dtype.items():
                flat = torch.cat([t.reshape(-1) for t in group]) if group else torch.empty(0, dtype=dtype)
                self._reduce_into(op, flat, None, opts.reduceOp)
                _add_finish(op, _unflatten(flat, group))

        return self._launch(op, body, sync=_is_sync(opts))

    def broadcast(self, tensors: Any, opts: Any = None) -> PycclWork:
        if isinstance(opts, int):  # legacy broadcast(tensor, root)
            root, opts = opts, BroadcastOptions()
            opts.rootRank = root
        opts = _opt(opts, BroadcastOptions)
        tl = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        t = tl[opts.rootTensor] if len(tl) > 1 else _single(tl, "broadcast")
        _check_cpu(t)
        root = opts.rootRank
        self._check_rank(root, "broadcast root")
        op = self._new_op("broadcast", [t], opts)

        def body(op: PendingOp) -> None:
            x = self._contig(op, t)
            op.keep.append(x)
            self._core(op, "broadcast", _ops.byte_view(x), root=root)

        return self._launch(op, body, sync=_is_sync(opts))

    def reduce(self, tensors: Any, opts: Any = None) -> PycclWork:
        opts = _opt(opts, ReduceOptions)
        t = _single(tensors, "reduce")
        _check_cpu(t)
        root = opts.rootRank
        self._check_rank(root, "reduce root")
        op = self._new_op("reduce", [t], opts)

        def body(op: PendingOp) -> None:
            x = t.contiguous()
            result = torch.empty_like(x)
            self._reduce_into(op, x, result, opts.reduceOp)
            if self._rank == root:
                _add_finish(op, lambda: t.copy_(result))

        return self._launch(op, body, sync=_is_sync(opts))

    # --------------------------------------------------------------- gathers

    def allgather(self, output_tensors: Any, input_tensors: Any, opts: Any = None) -> PycclWork:
        outputs = list(output_tensors[0]) if output_tensors and isinstance(output_tensors[0], (list, tuple)) else list(output_tensors)
        t = _single(input_tensors, "allgather")
        _check_cpu(t, *outputs)
        self._check_len(outputs, "allgather output list")
        op = self._new_op("allgather", outputs, opts)
        return self._launch(op, lambda op: self._allgather_list(op, outputs, t), sync=_is_sync(opts))

    def _allgather_list(self, op: PendingOp, outputs: list[torch.Tensor], t: torch.Tensor) -> None:
        for o in outputs:
            if o.dtype != t.dtype:
                raise ValueError(f"allgather: output dtype {o.dtype} differs from the input's {t.dtype}")
        x = t.contiguous()
        if all(o.numel() == t.numel() for o in outputs):
            nb = x.numel() * x.element_size()
            staging = torch.empty(self._size * nb, dtype=torch.uint8)
            op.keep += [x, staging]
            self._core(op, "all_gather", _ops.byte_view(x), staging)

            def fin() -> None:
                for i, o in enumerate(outputs):
                    o.copy_(staging[i * nb:(i + 1) * nb].view(o.dtype).view(o.shape))

            _add_finish(op, fin)
            return
        # Uneven sizes: one broadcast per rank (the ring all-gather needs equal blocks).
        if outputs[self._rank].numel() != t.numel():
            raise ValueError(f"allgather: this rank's output slot has {outputs[self._rank].numel()} elements, "
                             f"its input {t.numel()}")
        for i, o in enumerate(outputs):
            buf = o if o.is_contiguous() else torch.empty(o.shape, dtype=o.dtype)
            if i == self._rank:
                buf.view(-1).copy_(x.view(-1))
            op.keep.append(buf)
            self._core(op, "broadcast", _ops.byte_view(buf), root=i)
            if buf is not o:
                _add_finish(op, (lambda o=o, buf=buf: o.copy_(buf)))

    def _allgather_flat(self, op: PendingOp, output: torch.Tensor, t: torch.Tensor) -> None:
        if output.dtype != t.dtype:
            raise ValueError(f"output dtype {output.dtype} differs from the input's {t.dtype}")
        if output.numel() != t.numel() * self._size:
            raise ValueError(f"output has {output.numel()} elements, expected world_size ({self._size}) x "
                             f"{t.numel()}")
        out = self._contig(op, output, copy_in=False)
        x = t.contiguous()
        if _overlaps(x, out):  # FSDP2 gathers in place: the input is a slice of the output
            x = x.clone()
        op.keep += [x, out]
        self._core(op, "all_gather", _ops.byte_view(x), _ops.byte_view(out))

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> PycclWork:
        _check_cpu(output, input)
        op = self._new_op("all_gather_into_tensor", [output], opts)
        return self._launch(op, lambda op: self._allgather_flat(op, output, input), sync=_is_sync(opts))

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> PycclWork:
        outputs, inputs = list(outputs), list(inputs)
        if len(outputs) != len(inputs):
            raise ValueError("pyccl: all_gather coalesced: outputs and inputs differ in length")
        _check_cpu(*outputs, *inputs)
        op = self._new_op("all_gather_into_tensor_coalesced", outputs, opts)

        def body(op: PendingOp) -> None:
            for o, i in zip(outputs, inputs):
                self._allgather_flat(op, o, i)

        return self._launch(op, body, sync=_is_sync(opts))

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> PycclWork:
        """torch's layout: ``output_lists[r][i]`` receives rank r's ``inputs[i]``."""
        output_lists, inputs = [list(o) for o in output_lists], list(inputs)
        self._check_len(output_lists, "allgather_coalesced output lists")
        for lst in output_lists:
            if len(lst) != len(inputs):
                raise ValueError(f"pyccl: allgather_coalesced: an output list has {len(lst)} tensors for "
                                 f"{len(inputs)} inputs")
        per_input = [[output_lists[r][i] for r in range(self._size)] for i in range(len(inputs))]
        flat_out = [o for lst in output_lists for o in lst]
        _check_cpu(*inputs, *flat_out)
        op = self._new_op("allgather_coalesced", flat_out, opts)

        def body(op: PendingOp) -> None:
            for lst, t in zip(per_input, inputs):
                self._allgather_list(op, lst, t)

        return self._launch(op, body, sync=_is_sync(opts))

    def gather(self, output_tensors: Any, input_tensors: Any, opts: Any = None) -> PycclWork:
        opts = _opt(opts, GatherOptions)
        root = opts.rootRank
        self._check_rank(root, "gather root")
        t = _single(input_tensors, "gather")
        outputs = list(output_tensors[0]) if output_tensors and len(output_tensors) and isinstance(output_tensors[0], (list, tuple)) else list(output_tensors or [])
        _check_cpu(t, *outputs)
        if self._rank == root:
            self._check_len(outputs, "gather output list")
        op = self._new_op("gather", outputs, opts)

        def body(op: PendingOp) -> None:
            x = t.contiguous()
            nb = x.numel() * x.element_size()
            staging = torch.empty(self._size * nb, dtype=torch.uint8)
            op.keep += [x, staging]
            self._core(op, "all_gather", _ops.byte_view(x), staging)
            if self._rank == root:
                def fin() -> None:
                    for i, o in enumerate(outputs):
                        o.copy_(staging[i * nb:(i + 1) * nb].view(o.dtype).view(o.shape))

                _add_finish(op, fin)

        return self._launch(op, body, sync=_is_sync(opts))

    def scatter(self, output_tensors: Any, input_tensors: Any, opts: Any = None) -> PycclWork:
        opts = _opt(opts, ScatterOptions)
        root = opts.rootRank
        self._check_rank(root, "scatter root")
        out = _single(output_tensors, "scatter")
        inputs = list(input_tensors[0]) if input_tensors and len(input_tensors) and isinstance(input_tensors[0], (list, tuple)) else list(input_tensors or [])
        _check_cpu(out, *inputs)
        if self._rank == root:
            self._check_len(inputs, "scatter input list")
        op = self._new_op("scatter", [out], opts)

        def body(op: PendingOp) -> None:
            # A broadcast of the root's concatenated list; each rank keeps its block.
            nb = out.numel() * out.element_size()
            staging = torch.empty(self._size * nb, dtype=torch.uint8)
            if self._rank == root:
                for i, x in enumerate(inputs):
                    if x.numel() * x.element_size() != nb:
                        raise ValueError(f"scatter: input {i} has {x.numel()} elements, the output {out.numel()}")
                    staging[i * nb:(i + 1) * nb].copy_(_ops.byte_view(x.contiguous()))
            op.keep += [staging, out]
            self._core(op, "broadcast", staging, root=root)
            r = self._rank
            _add_finish(op, lambda: out.copy_(staging[r * nb:(r + 1) * nb].view(out.dtype).view(out.shape)))

        return self._launch(op, body, sync=_is_sync(opts))

    # ------------------------------------------------------- reduce-scatters

    def reduce_scatter(self, output_tensors: Any, input_lists: Any, opts: Any = None) -> PycclWork:
        opts = _opt(opts, ReduceScatterOptions)
        out = _single(output_tensors, "reduce_scatter")
        inputs = list(input_lists[0]) if input_lists and isinstance(input_lists[0], (list, tuple)) else list(input_lists)
        _check_cpu(out, *inputs)
        self._check_len(inputs, "reduce_scatter input list")
        op = self._new_op("reduce_scatter", [out], opts)

        def body(op: PendingOp) -> None:
            for x in inputs:
                if x.dtype != out.dtype:
                    raise ValueError(f"reduce_scatter: input dtype {x.dtype} differs from the output's {out.dtype}")
            if all(x.numel() == out.numel() for x in inputs):
                flat = torch.cat([x.reshape(-1) for x in inputs])
                o = self._contig(op, out, copy_in=False)
                self._reduce_scatter_into(op, flat, o.view(-1), opts.reduceOp)
                return
            # Uneven blocks: all-reduce everything, keep this rank's block.
            flat = torch.cat([x.reshape(-1) for x in inputs])
            self._reduce_into(op, flat, None, opts.reduceOp)
            start = sum(x.numel() for x in inputs[: self._rank])
            n = out.numel()
            _add_finish(op, lambda: out.view(-1).copy_(flat[start:start + n]) if out.is_contiguous()
                        else out.copy_(flat[start:start + n].view(out.shape)))

        return self._launch(op, body, sync=_is_sync(opts))

    def _reduce_scatter_flat(self, op: PendingOp, output: torch.Tensor, input: torch.Tensor, rop: Any) -> None:
        if output.dtype != input.dtype:
            raise ValueError(f"output dtype {output.dtype} differs from the input's {input.dtype}")
        if input.numel() != output.numel() * self._size:
            raise ValueError(f"input has {input.numel()} elements, expected world_size ({self._size}) x {output.numel()}")
        o = self._contig(op, output, copy_in=False)
        x = input.contiguous()
        self._reduce_scatter_into(op, x.view(-1), o.view(-1), rop)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> PycclWork:
        opts = _opt(opts, ReduceScatterOptions)
        _check_cpu(output, input)
        op = self._new_op("reduce_scatter_tensor", [output], opts)
        return self._launch(op, lambda op: self._reduce_scatter_flat(op, output, input, opts.reduceOp), sync=_is_sync(opts))

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> PycclWork:
        opts = _opt(opts, ReduceScatterOptions)
        outputs, inputs = list(outputs), list(inputs)
        if len(outputs) != len(inputs):
            raise ValueError("pyccl: reduce_scatter coalesced: outputs and inputs differ in length")
        _check_cpu(*outputs, *inputs)
        op = self._new_op("reduce_scatter_tensor_coalesced", outputs, opts)

        def body(op: PendingOp) -> None:
            for o, i in zip(outputs, inputs):
                self._reduce_scatter_flat(op, o, i, opts.reduceOp)

        return self._launch(op, body, sync=_is_sync(opts))

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    # ----------------------------------------------------------- all-to-all

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
        opts: Any = None,
    ) -> PycclWork:
        _check_cpu(output, input)
        n = self._size
        if output.dtype != input.dtype:
            raise ValueError("pyccl: all_to_all_single: input and output dtypes differ")
        in_rows = _rows(input, input_split_sizes, n, "input")
        out_rows = _rows(output, output_split_sizes, n, "output")
        op = self._new_op("all_to_all_single", [output], opts)

        def body(op: PendingOp) -> None:
            x = input.contiguous()
            o = self._contig(op, output, copy_in=False)
            row_in = math.prod(x.shape[1:]) if x.dim() else 1  # (dim 0 may be empty)
            row_out = math.prod(o.shape[1:]) if o.dim() else 1
            xf, of = x.reshape(-1), o.reshape(-1)
            sends = [xf[a * row_in:b * row_in] for a, b in in_rows]
            recvs = [of[a * row_out:b * row_out] for a, b in out_rows]
            op.keep += [x, o]
            self._exchange(op, sends, recvs)

        return self._launch(op, body, sync=_is_sync(opts))

    alltoall_base = all_to_all_single

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor], opts: Any = None) -> PycclWork:
        outputs, inputs = list(output_tensors), list(input_tensors)
        _check_cpu(*outputs, *inputs)
        self._check_len(outputs, "alltoall output list")
        self._check_len(inputs, "alltoall input list")
        op = self._new_op("alltoall", outputs, opts)

        def body(op: PendingOp) -> None:
            sends = [x.contiguous() for x in inputs]
            recvs = [self._contig(op, o, copy_in=False) for o in outputs]
            self._exchange(op, sends, recvs)

        return self._launch(op, body, sync=_is_sync(opts))

    def _exchange(self, op: PendingOp, sends: list[torch.Tensor], recvs: list[torch.Tensor]) -> None:
        """All-to-all over the side channel: block i of ``sends`` goes to rank i."""
        assert self._endpoint is not None
        tag = self._a2a_seq
        self._a2a_seq += 1
        me = self._rank
        op.keep += sends + recvs
        if sends[me].numel() != recvs[me].numel() or sends[me].dtype != recvs[me].dtype:
            raise ValueError(f"all-to-all: this rank sends itself {sends[me].numel()} x {sends[me].dtype} "
                             f"but expects {recvs[me].numel()} x {recvs[me].dtype}")
        recvs[me].view(-1).copy_(sends[me].reshape(-1))
        for k in range(1, self._size):
            src = (me - k) % self._size
            dst = (me + k) % self._size
            op.add_part()
            self._endpoint.post_recv(_ops.byte_view(recvs[src]), src, tag, _p2p.KIND_A2A,
                                     lambda s, e: op.part_done(e))
            op.add_part()
            self._endpoint.send(_ops.byte_view(sends[dst]), dst, tag, _p2p.KIND_A2A, op.part_done)

    # ------------------------------------------------------------------ p2p

    def send(self, tensors: Any, dstRank: int, tag: int = 0) -> PycclWork:  # noqa: N803 - torch's names
        t = _single(tensors, "send")
        _check_cpu(t)
        self._check_rank(dstRank, "send destination")
        op = self._new_op("send", [t])

        def body(op: PendingOp) -> None:
            assert self._endpoint is not None
            x = t.contiguous()
            op.keep.append(x)
            op.add_part()
            self._endpoint.send(_ops.byte_view(x), dstRank, int(tag), _p2p.KIND_P2P, op.part_done)

        return self._launch(op, body)

    def recv(self, tensors: Any, srcRank: int, tag: int = 0) -> PycclWork:  # noqa: N803
        self._check_rank(srcRank, "recv source")
        return self._recv(tensors, srcRank, tag)

    def recv_anysource(self, tensors: Any, tag: int = 0) -> PycclWork:
        return self._recv(tensors, -1, tag)

    def _recv(self, tensors: Any, src: int, tag: int) -> PycclWork:
        t = _single(tensors, "recv")
        _check_cpu(t)
        op = self._new_op("recv", [t])
        work = op.work

        def body(op: PendingOp) -> None:
            assert self._endpoint is not None
            x = self._contig(op, t, copy_in=False)
            op.keep.append(x)

            def done(source: int, error: BaseException | None) -> None:
                work._source_rank_value = source
                op.part_done(error)

            op.add_part()
            self._endpoint.post_recv(_ops.byte_view(x), src, int(tag), _p2p.KIND_P2P, done)

        return self._launch(op, body)

    # -------------------------------------------------------------- barrier

    def barrier(self, opts: Any = None) -> PycclWork:
        op = self._new_op("barrier", [], opts)

        def body(op: PendingOp) -> None:
            # Complete only after every op issued before it (as gloo does), and
            # after every rank got here (a 1-element all-reduce).
            with self._state_lock:
                earlier = [o for k, o in self._inflight.items() if o is not op]
            for o in earlier:
                op.add_part()
                o.then(lambda: op.part_done(None))
            token = torch.zeros(1, dtype=torch.int32)
            op.keep.append(token)
            self._core(op, "all_reduce", token, op="sum")

        return self._launch(op, body, sync=_is_sync(opts))

    def monitored_barrier(self, timeout: Any = None, wait_all_ranks: bool = False) -> None:
        """gloo's monitored barrier: rank 0 waits at most ``timeout`` (None:
        the group's) for every other rank and raises naming the first rank
        that did not arrive (``wait_all_ranks``: all of them); see
        :mod:`pyccl.torch._monitored_barrier`. torch's ``dist.monitored_barrier``
        accepts only a backend named gloo: call this method on the group."""
        self._ensure_usable("monitored_barrier")
        assert self._endpoint is not None
        limit = self._timeout if timeout is None else max(0.0, _as_seconds(timeout))
        monitored_barrier(self._endpoint, self._rank, self._size, limit, self._timeout, wait_all_ranks)

    # ----------------------------------------------------------- coalescing

    def _start_coalescing(self, device: Any = None) -> None:
        with self._issue_lock:
            self._coalescing = []

    def _end_coalescing(self, device: Any = None) -> PycclWork:
        with self._issue_lock:
            works, self._coalescing = self._coalescing or [], None
        op = self._new_op("coalesced", [t for w in works for t in w._result])

        def body(op: PendingOp) -> None:
            for w in works:
                op.add_part()
                _on_work_done(w, op)

        return self._launch(op, body)

    # ============================================================= shutdown

    def shutdown(self) -> None:
        self._close(handshake=True)

    def abort(self) -> None:
        self._close(handshake=False)

    def _close(self, handshake: bool) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        RUNTIME.groups.discard(self)
        comm, self._comm = self._comm, None
        master_lost = bool(_comm_lost(comm))
        if comm is not None:
            try:
                comm.close()  # fails (and joins) the core ops still running
            except Exception:  # noqa: BLE001
                log.debug("pyccl: closing the communicator failed", exc_info=True)
        if self._endpoint is not None:
            self._endpoint.fail_all(f"pyccl: process group '{self._group_name}' was shut down", close=True)
            self._endpoint.hub.unregister(self._endpoint)
            self._endpoint = None
            RUNTIME.release_hub()
        self._runner.stop()  # its queued ops fail at once: the comm is closed
        self._watchdog.stop()
        if handshake and self._owns_master_group and not master_lost:
            self._closing_handshake()
        self._completer.stop()
        if self._master is not None:
            try:
                self._master.stop()
            except Exception:  # noqa: BLE001
                log.debug("pyccl: stopping the master failed", exc_info=True)
            self._master = None
        if self._is_default:
            with RUNTIME.lock:
                if RUNTIME.default_store is self._store:
                    RUNTIME.default_master = None
                    RUNTIME.default_store = None

    def _closing_handshake(self) -> None:
        """Count this rank as closed; the master's owner waits (bounded) for the
        live others, so no rank loses the master while it is still closing."""
        try:
            self._store.add(self._key("closed"), 1)
            if self._master is None:
                return
            expected = self._size - len(self._lost_at_break)
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                if int(self._store.add(self._key("closed"), 0)) >= expected:
                    return
                time.sleep(0.01)
            log.warning("pyccl: not every rank of '%s' shut down within 10 s; stopping the master anyway",
                        self._group_name)
        except Exception:  # noqa: BLE001 - the store may be gone (its host died)
            log.debug("pyccl: shutdown handshake failed", exc_info=True)

    # ============================================================== checks

    def _check_rank(self, r: int, what: str) -> None:
        if not isinstance(r, int) or not 0 <= r < self._size:
            raise ValueError(f"pyccl: {what} {r!r} is not a rank of a group of {self._size}")

    def _check_len(self, lst: list[Any], what: str) -> None:
        if len(lst) != self._size:
            raise ValueError(f"pyccl: {what} has {len(lst)} entries, expected the group size {self._size}")


# ---------------------------------------------------------------- helpers


def _as_seconds(t: Any) -> float:
    return t.total_seconds() if isinstance(t, timedelta) else float(t)


def _core_reason(message: str) -> str:
    """The cause inside a core PeerFailure message, without its advice to retry
    (a torch process group has a fixed membership: there is nothing to retry)."""
    m = re.search(r"because the group changed \((.*)\); world size is now", message)
    return m.group(1) if m else message


def _add_finish(op: PendingOp, fn: Callable[[], Any]) -> None:
    prev = op.finish
    if prev is None:
        op.finish = fn
    else:
        def both() -> None:
            prev()
            fn()

        op.finish = both


def _unflatten(flat: torch.Tensor, group: list[torch.Tensor]) -> Callable[[], None]:
    def fin() -> None:
        off = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[off:off + n].view(t.shape))
            off += n

    return fin


def _rows(t: torch.Tensor, splits: list[int] | None, n: int, what: str) -> list[tuple[int, int]]:
    """Row ranges [a, b) of dim 0 per rank."""
    rows = t.shape[0] if t.dim() else t.numel()
    if not splits:
        if rows % n:
            raise ValueError(f"pyccl: all_to_all_single: {what} dim 0 ({rows}) is not divisible by the group size {n}")
        splits = [rows // n] * n
    if len(splits) != n or sum(splits) != rows:
        raise ValueError(f"pyccl: all_to_all_single: {what} split sizes {list(splits)} do not cover dim 0 ({rows})")
    out, a = [], 0
    for s in splits:
        out.append((a, a + s))
        a += s
    return out


def _on_work_done(w: PycclWork, op: PendingOp) -> None:
    """Release one part of ``op`` when ``w`` completes (on the completion thread)."""
    def cb(f: torch.futures.Future) -> None:
        op.part_done(w.exception())

    w._fut.add_done_callback(cb)
