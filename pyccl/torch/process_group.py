"""``ProcessGroupPyccl``: a torch.distributed ProcessGroup over pyccl.

Every torch entry point (current and legacy names) checks its arguments,
creates one :class:`~pyccl.torch._work.PendingOp` and launches it with a
body from :mod:`~pyccl.torch._lowering`, which adds the op's parts: core
collectives of the group's Communicator (run by the group's runner in issue
order, so every rank gives them the same sequence numbers), point-to-point
transfers on the side channel, and earlier ops (a barrier waits for
everything issued before it).

Around the entry points: :mod:`~pyccl.torch._rendezvous` forms the group,
:mod:`~pyccl.torch._health` says whether it is still whole and words its
errors, :mod:`~pyccl.torch._launcher` issues the ops (its watchdog enforces
timeouts), and :mod:`~pyccl.torch._work` completes the Works.

Failure: an op that fails because the group lost a member (the core raises
``PeerFailure``, or the op ran after the membership changed), or that timed
out, fails its Work with a :class:`BackendError` naming pyccl and the cause,
and marks the group broken: every later call raises at once. A torch
process group has a fixed membership, so there is no retry: destroy it and
re-initialise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.distributed_c10d import (
    AllreduceCoalescedOptions,
    AllreduceOptions,
    BarrierOptions,
    BroadcastOptions,
    GatherOptions,
    ReduceOptions,
    ReduceScatterOptions,
    ScatterOptions,
)

import torch
from pyccl.torch import _lowering as L
from pyccl.torch._health import GroupHealth
from pyccl.torch._launcher import Launcher
from pyccl.torch._monitored_barrier import monitored_barrier
from pyccl.torch._rendezvous import Formed, closing_handshake, rendezvous
from pyccl.torch._runtime import RUNTIME, Options
from pyccl.torch._work import PendingOp, PycclWork, seconds

log = logging.getLogger("pyccl.torch")

__all__ = ["ProcessGroupPyccl"]


class ProcessGroupPyccl(dist.ProcessGroup):
    """A torch ProcessGroup whose collectives run on a pyccl Communicator."""

    def __init__(self, store: Any, rank: int, size: int, timeout: Any, group_name: str,
                 global_ranks: Sequence[int], options: Options) -> None:
        super().__init__(rank, size)  # type: ignore[call-arg]  # the (rank, size) constructor is missing from torch's stub
        self._rank, self._size = rank, size
        self._group_name, self._group_desc = group_name, ""
        self._store = store
        self._timeout = seconds(timeout, 1800.0)
        self._is_default = len(global_ranks) == 0
        self._global_ranks = list(global_ranks) if global_ranks else list(range(size))
        self._state_lock = threading.Lock()
        self._closed = False
        # What the rendezvous started, as it starts it (so a failed init can release it).
        self._master: Any = None
        self._endpoint: Any = None
        self._comm: Any = None
        self._health = GroupHealth(group_name, rank, size, self._global_ranks, None, "")
        self._ops = Launcher(group_name, self._timeout, self._health, self._on_timeout)
        self._formed: Formed | None = None
        try:
            formed = rendezvous(store, rank, size, self._timeout, group_name, self._global_ranks, options,
                                self._is_default, self._health.check, self._note_started)
        except BaseException:
            self._close(handshake=False)
            raise
        self._formed = formed
        self._health.master_host, self._health.master_address = formed.master_host, formed.master_address
        self._health.formed(formed.comm)
        formed.comm.on_membership_change(formed.endpoint.check)
        self._lower = L.Lowering(formed.comm, rank, size, formed.endpoint)
        RUNTIME.groups.add(self)

    def _note_started(self, master: Any, endpoint: Any, comm: Any) -> None:
        self._master = master or self._master
        self._endpoint = endpoint or self._endpoint
        self._comm = comm or self._comm

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
        self._timeout = self._ops.timeout = seconds(timeout, self._timeout)

    @property
    def communicator(self) -> Any:
        """The underlying :class:`pyccl.Communicator`."""
        return self._formed.comm if self._formed is not None else None

    def __repr__(self) -> str:
        return f"ProcessGroupPyccl(group={self._group_name!r}, rank={self._rank}, size={self._size})"

    # ============================================================ machinery

    def _on_timeout(self, op: PendingOp, timeout: float) -> None:
        """Watchdog thread: ``op`` outlived its timeout. Fail it with a timeout
        error and abort the group (as with gloo, the group cannot be trusted
        afterwards: some rank is elsewhere in the program): leaving the pyccl
        group releases the core ops blocked on the missing rank, and the
        other ranks see this one leave and fail their ops too."""
        message = self._health.timeout_message(op, timeout, self._timeout)
        self._health.timed_out = (op, message)
        if not self._health.break_with(message) or self._formed is None:
            return
        self._formed.comm.close()
        self._formed.endpoint.fail_all(message)

    def _check_rank(self, r: int, what: str) -> None:
        if not isinstance(r, int) or not 0 <= r < self._size:
            raise ValueError(f"pyccl: {what} {r!r} is not a rank of a group of {self._size}")

    def _check_len(self, lst: list[Any], what: str) -> None:
        if len(lst) != self._size:
            raise ValueError(f"pyccl: {what} has {len(lst)} entries, expected the group size {self._size}")

    # ============================================================ collectives

    def allreduce(self, tensors: Any, opts: Any = None) -> PycclWork:
        opts = L.options(opts, AllreduceOptions)
        t = L.single(tensors, "allreduce")
        if t.is_sparse:
            if t.device.type != "cpu":
                L.check_cpu(t)
            if opts.reduceOp != dist.ReduceOp.SUM:
                raise ValueError("pyccl: allreduce of sparse tensors only works with ReduceOp.SUM (as in gloo)")
            op = self._ops.new_op("allreduce (sparse)", [t], opts)
            return self._ops.launch(op, lambda op: self._lower.sparse_all_reduce(op, t), sync=L.is_sync(opts))
        L.check_cpu(t)
        op = self._ops.new_op("allreduce", [t], opts)
        return self._ops.launch(op, lambda op: self._lower.reduce_into(op, L.contig(op, t), None, opts.reduceOp),
                                sync=L.is_sync(opts), profile=("all_reduce", [t]))

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> PycclWork:
        opts = L.options(opts, AllreduceCoalescedOptions)
        tensors = list(tensors)
        L.check_cpu(*tensors)
        op = self._ops.new_op("allreduce_coalesced", tensors, opts)

        def body(op: PendingOp) -> None:
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for t in tensors:
                by_dtype.setdefault(t.dtype, []).append(t)
            for group in by_dtype.values():
                flat = torch.cat([t.reshape(-1) for t in group])
                self._lower.reduce_into(op, flat, None, opts.reduceOp)
                L.add_finish(op, L.unflatten(flat, group))

        return self._ops.launch(op, body, sync=L.is_sync(opts), profile=("all_reduce", tensors))

    def broadcast(self, tensors: Any, opts: Any = None) -> PycclWork:
        if isinstance(opts, int):  # legacy broadcast(tensor, root)
            root, opts = opts, BroadcastOptions()
            opts.rootRank = root
        opts = L.options(opts, BroadcastOptions)
        tl = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        t = tl[opts.rootTensor] if len(tl) > 1 else L.single(tl, "broadcast")
        L.check_cpu(t)
        self._check_rank(opts.rootRank, "broadcast root")
        op = self._ops.new_op("broadcast", [t], opts)
        return self._ops.launch(op, lambda op: self._lower.broadcast(op, t, opts.rootRank), sync=L.is_sync(opts),
                                profile=("broadcast", [t]))

    def reduce(self, tensors: Any, opts: Any = None) -> PycclWork:
        opts = L.options(opts, ReduceOptions)
        t = L.single(tensors, "reduce")
        L.check_cpu(t)
        root = opts.rootRank
        self._check_rank(root, "reduce root")
        op = self._ops.new_op("reduce", [t], opts)

        def body(op: PendingOp) -> None:
            x = t.contiguous()
            result = torch.empty_like(x)
            self._lower.reduce_into(op, x, result, opts.reduceOp)
            if self._rank == root:
                L.add_finish(op, lambda: t.copy_(result))

        return self._ops.launch(op, body, sync=L.is_sync(opts), profile=("reduce", [t]))

    # --------------------------------------------------------------- gathers

    def allgather(self, output_tensors: Any, input_tensors: Any, opts: Any = None) -> PycclWork:
        outputs = L.flat_list(output_tensors)
        t = L.single(input_tensors, "allgather")
        L.check_cpu(t, *outputs)
        self._check_len(outputs, "allgather output list")
        op = self._ops.new_op("allgather", outputs, opts)
        return self._ops.launch(op, lambda op: self._lower.allgather_list(op, outputs, t), sync=L.is_sync(opts),
                                profile=("all_gather", [t]))

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> PycclWork:
        L.check_cpu(output, input)
        op = self._ops.new_op("all_gather_into_tensor", [output], opts)
        return self._ops.launch(op, lambda op: self._lower.allgather_flat(op, output, input), sync=L.is_sync(opts))

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                    opts: Any = None) -> PycclWork:
        outputs, inputs = list(outputs), list(inputs)
        if len(outputs) != len(inputs):
            raise ValueError("pyccl: all_gather coalesced: outputs and inputs differ in length")
        L.check_cpu(*outputs, *inputs)
        op = self._ops.new_op("all_gather_into_tensor_coalesced", outputs, opts)

        def body(op: PendingOp) -> None:
            for o, i in zip(outputs, inputs):
                self._lower.allgather_flat(op, o, i)

        return self._ops.launch(op, body, sync=L.is_sync(opts))

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor],
                            opts: Any = None) -> PycclWork:
        """torch's layout: ``output_lists[r][i]`` receives rank r's ``inputs[i]``."""
        output_lists, inputs = [list(o) for o in output_lists], list(inputs)
        self._check_len(output_lists, "allgather_coalesced output lists")
        for lst in output_lists:
            if len(lst) != len(inputs):
                raise ValueError(f"pyccl: allgather_coalesced: an output list has {len(lst)} tensors for "
                                 f"{len(inputs)} inputs")
        per_input = [[output_lists[r][i] for r in range(self._size)] for i in range(len(inputs))]
        flat_out = [o for lst in output_lists for o in lst]
        L.check_cpu(*inputs, *flat_out)
        op = self._ops.new_op("allgather_coalesced", flat_out, opts)

        def body(op: PendingOp) -> None:
            for lst, t in zip(per_input, inputs):
                self._lower.allgather_list(op, lst, t)

        return self._ops.launch(op, body, sync=L.is_sync(opts), profile=("all_gather", inputs))

    def gather(self, output_tensors: Any, input_tensors: Any, opts: Any = None) -> PycclWork:
        opts = L.options(opts, GatherOptions)
        root = opts.rootRank
        self._check_rank(root, "gather root")
        t = L.single(input_tensors, "gather")
        outputs = L.flat_list(output_tensors)
        L.check_cpu(t, *outputs)
        if self._rank == root:
            self._check_len(outputs, "gather output list")
        op = self._ops.new_op("gather", outputs, opts)
        keep = outputs if self._rank == root else None
        return self._ops.launch(op, lambda op: self._lower.gather_to(op, t.contiguous(), keep), sync=L.is_sync(opts))

    def scatter(self, output_tensors: Any, input_tensors: Any, opts: Any = None) -> PycclWork:
        opts = L.options(opts, ScatterOptions)
        root = opts.rootRank
        self._check_rank(root, "scatter root")
        out = L.single(output_tensors, "scatter")
        inputs = L.flat_list(input_tensors)
        L.check_cpu(out, *inputs)
        if self._rank == root:
            self._check_len(inputs, "scatter input list")
        op = self._ops.new_op("scatter", [out], opts)
        return self._ops.launch(op, lambda op: self._lower.scatter(op, out, inputs, root), sync=L.is_sync(opts))

    # ------------------------------------------------------- reduce-scatters

    def reduce_scatter(self, output_tensors: Any, input_lists: Any, opts: Any = None) -> PycclWork:
        opts = L.options(opts, ReduceScatterOptions)
        out = L.single(output_tensors, "reduce_scatter")
        inputs = L.flat_list(input_lists)
        L.check_cpu(out, *inputs)
        self._check_len(inputs, "reduce_scatter input list")
        op = self._ops.new_op("reduce_scatter", [out], opts)
        return self._ops.launch(op, lambda op: self._lower.reduce_scatter_list(op, out, inputs, opts.reduceOp),
                            sync=L.is_sync(opts))

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> PycclWork:
        opts = L.options(opts, ReduceScatterOptions)
        L.check_cpu(output, input)
        op = self._ops.new_op("reduce_scatter_tensor", [output], opts)
        return self._ops.launch(op, lambda op: self._lower.reduce_scatter_flat(op, output, input, opts.reduceOp),
                            sync=L.is_sync(opts))

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                        opts: Any = None) -> PycclWork:
        opts = L.options(opts, ReduceScatterOptions)
        outputs, inputs = list(outputs), list(inputs)
        if len(outputs) != len(inputs):
            raise ValueError("pyccl: reduce_scatter coalesced: outputs and inputs differ in length")
        L.check_cpu(*outputs, *inputs)
        op = self._ops.new_op("reduce_scatter_tensor_coalesced", outputs, opts)

        def body(op: PendingOp) -> None:
            for o, i in zip(outputs, inputs):
                self._lower.reduce_scatter_flat(op, o, i, opts.reduceOp)

        return self._ops.launch(op, body, sync=L.is_sync(opts))

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    # ----------------------------------------------------------- all-to-all

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int] | None = None,
                          input_split_sizes: list[int] | None = None, opts: Any = None) -> PycclWork:
        L.check_cpu(output, input)
        if output.dtype != input.dtype:
            raise ValueError("pyccl: all_to_all_single: input and output dtypes differ")
        in_rows = L.rows(input, input_split_sizes, self._size, "input")
        out_rows = L.rows(output, output_split_sizes, self._size, "output")
        op = self._ops.new_op("all_to_all_single", [output], opts)
        return self._ops.launch(op, lambda op: self._lower.all_to_all_single(op, output, input, in_rows, out_rows),
                            sync=L.is_sync(opts))

    alltoall_base = all_to_all_single

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor],
                 opts: Any = None) -> PycclWork:
        outputs, inputs = list(output_tensors), list(input_tensors)
        L.check_cpu(*outputs, *inputs)
        self._check_len(outputs, "alltoall output list")
        self._check_len(inputs, "alltoall input list")
        op = self._ops.new_op("alltoall", outputs, opts)

        def body(op: PendingOp) -> None:
            self._lower.exchange(op, [x.contiguous() for x in inputs],
                                 [L.contig(op, o, copy_in=False) for o in outputs])

        return self._ops.launch(op, body, sync=L.is_sync(opts))

    # ------------------------------------------------------------------ p2p

    def send(self, tensors: Any, dstRank: int, tag: int = 0) -> PycclWork:  # noqa: N803 - torch's names
        t = L.single(tensors, "send")
        L.check_cpu(t)
        self._check_rank(dstRank, "send destination")
        op = self._ops.new_op("send", [t])
        return self._ops.launch(op, lambda op: self._lower.send(op, t, dstRank, int(tag)), profile=("send", [t]))

    def recv(self, tensors: Any, srcRank: int, tag: int = 0) -> PycclWork:  # noqa: N803
        self._check_rank(srcRank, "recv source")
        return self._recv(tensors, srcRank, tag)

    def recv_anysource(self, tensors: Any, tag: int = 0) -> PycclWork:
        return self._recv(tensors, -1, tag)

    def _recv(self, tensors: Any, src: int, tag: int) -> PycclWork:
        t = L.single(tensors, "recv")
        L.check_cpu(t)
        op = self._ops.new_op("recv", [t])
        return self._ops.launch(op, lambda op: self._lower.recv(op, t, src, int(tag)),
                                profile=("recv" if src >= 0 else "recvAnySource", [t]))

    # -------------------------------------------------------------- barrier

    def barrier(self, opts: Any = None) -> PycclWork:
        opts = L.options(opts, BarrierOptions)
        op = self._ops.new_op("barrier", [], opts)

        def body(op: PendingOp) -> None:
            # Complete only after every op issued before it (as gloo does), and
            # after every rank got here (a 1-element all-reduce).
            earlier = self._ops.in_flight(but=op)
            for o in earlier:
                op.add_part()
                o.then(lambda: op.part_done(None))
            self._lower.reduce_into(op, torch.zeros(1, dtype=torch.int32), None, dist.ReduceOp.SUM)

        return self._ops.launch(op, body, sync=L.is_sync(opts))

    def monitored_barrier(self, timeout: Any = None, wait_all_ranks: bool = False) -> None:
        """gloo's monitored barrier: rank 0 waits at most ``timeout`` (None:
        the group's) for every other rank and raises naming the first rank
        that did not arrive (``wait_all_ranks``: all of them); see
        :mod:`pyccl.torch._monitored_barrier`. torch's ``dist.monitored_barrier``
        accepts only a backend named gloo: call this method on the group."""
        self._health.ensure_usable("monitored_barrier")
        assert self._formed is not None
        if timeout is None:
            limit = self._timeout
        else:
            limit = max(0.0, timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout))
        monitored_barrier(self._formed.endpoint, self._rank, self._size, limit, self._timeout, wait_all_ranks)

    # ----------------------------------------------------------- coalescing

    def _start_coalescing(self, device: Any = None) -> None:
        with self._ops.issue_lock:
            self._ops.coalescing = []

    def _end_coalescing(self, device: Any = None) -> PycclWork:
        with self._ops.issue_lock:
            works, self._ops.coalescing = self._ops.coalescing or [], None
        op = self._ops.new_op("coalesced", [t for w in works for t in w._result])

        def body(op: PendingOp) -> None:
            for w in works:
                op.add_part()
                L.release_when_done(w, op)

        return self._ops.launch(op, body)

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
        self._health.closed = True
        RUNTIME.groups.discard(self)
        formed, self._formed = self._formed, None
        comm, endpoint, master = self._comm, self._endpoint, self._master
        self._comm = self._endpoint = self._master = None
        master_lost = comm is not None and comm.lost is not None
        if comm is not None:
            try:
                comm.close()  # fails (and joins) the core ops still running
            except Exception:
                log.debug("pyccl: closing the communicator failed", exc_info=True)
        if endpoint is not None:
            endpoint.fail_all(f"pyccl: process group '{self._group_name}' was shut down", close=True)
            endpoint.hub.unregister(endpoint)
            RUNTIME.release_hub()
        self._ops.stop_issuing()  # queued ops fail at once: the comm is closed
        if handshake and formed is not None and formed.owns_master_group and not master_lost:
            live = [r for r in range(self._size) if r not in self._health.lost_at_break]
            closing_handshake(self._store, formed.prefix, self._rank, live, master is not None, self._group_name)
        self._ops.stop_completing()
        if master is not None:
            try:
                master.stop()
            except Exception:
                log.debug("pyccl: stopping the master failed", exc_info=True)
        if self._is_default:
            with RUNTIME.lock:
                if RUNTIME.default_store is self._store:
                    RUNTIME.default_master = None
                    RUNTIME.default_store = None
