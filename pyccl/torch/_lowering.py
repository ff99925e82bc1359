"""Lowering torch calls into parts of a :class:`~pyccl.torch._work.PendingOp`.

Each ``*_body`` builds what one torch entry point needs: staging buffers
(non-contiguous tensors, PREMUL_SUM products, coalesced flats, list-form
gathers), core collectives appended to ``op.calls`` as bound methods of the
group's Communicator (run later, in issue order, by the group's runner),
point-to-point transfers on the side channel, and a ``finish`` step that
copies results out once the op is over. Inputs are never written before
the core commits an op, and every tensor the core or the side channel
touches is kept in ``op.keep`` until the op completes (raw pointers into a
freed tensor would give wrong results silently).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch.distributed as dist

import torch
from pyccl.peer import Communicator
from pyccl.torch import _ops, _p2p
from pyccl.torch._work import BackendError, PendingOp, PycclWork

# ------------------------------------------------------------- arguments


def is_sync(opts: Any) -> bool:
    """``async_op=False`` in the dist API: the caller waits at once."""
    return opts is not None and getattr(opts, "asyncOp", True) is False


def single(tensors: Any, what: str) -> torch.Tensor:
    if isinstance(tensors, torch.Tensor):
        return tensors
    if len(tensors) != 1:
        raise ValueError(f"pyccl: {what} takes exactly one tensor per call (one device per process), got {len(tensors)}")
    t: torch.Tensor = tensors[0]
    return t


def flat_list(tensors: Any) -> list[torch.Tensor]:
    """torch's ``[[t0, t1, ...]]`` (one device) or ``[t0, t1, ...]`` as a list."""
    if tensors and isinstance(tensors[0], (list, tuple)):
        return list(tensors[0])
    return list(tensors or [])


def check_cpu(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu":
            raise BackendError(
                f"pyccl: tensor on {t.device} is not supported: this pyccl build has no CUDA/accelerator path "
                "(the core moves CPU memory only); move the tensor to the CPU or use backend='nccl' for it"
            )
        if t.is_sparse:
            raise BackendError("pyccl: sparse tensors are supported by allreduce (SUM) only, as in gloo")


def options(opts: Any, cls: type) -> Any:
    """Accept an options object, a bare ReduceOp / RedOpType (legacy call forms), or None."""
    if opts is None:
        return cls()
    if isinstance(opts, cls):
        return opts
    if isinstance(opts, (dist.ReduceOp, dist.ReduceOp.RedOpType)):
        o = cls()
        o.reduceOp = opts if isinstance(opts, dist.ReduceOp) else dist.ReduceOp(opts)
        return o
    return opts


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1 = a0 + a.numel() * a.element_size()
    b1 = b0 + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


def rows(t: torch.Tensor, splits: Sequence[int] | None, n: int, what: str) -> list[tuple[int, int]]:
    """Row ranges [a, b) of dim 0 per rank."""
    count = t.shape[0] if t.dim() else t.numel()
    if not splits:
        if count % n:
            raise ValueError(f"pyccl: all_to_all_single: {what} dim 0 ({count}) is not divisible by the group size {n}")
        splits = [count // n] * n
    if len(splits) != n or sum(splits) != count:
        raise ValueError(f"pyccl: all_to_all_single: {what} split sizes {list(splits)} do not cover dim 0 ({count})")
    out, a = [], 0
    for s in splits:
        out.append((a, a + s))
        a += s
    return out


# --------------------------------------------------------------- finishing


def add_finish(op: PendingOp, fn: Callable[[], Any]) -> None:
    """Run ``fn`` after the op's earlier finish steps, once the op succeeded."""
    prev = op.finish
    if prev is None:
        op.finish = fn
    else:
        def both() -> None:
            prev()
            fn()

        op.finish = both


def contig(op: PendingOp, t: torch.Tensor, copy_in: bool = True, copy_back: bool = True) -> torch.Tensor:
    """A contiguous tensor with ``t``'s values; copies back into ``t`` at the end if it had to stage."""
    if t.is_contiguous():
        return t
    staged = t.contiguous() if copy_in else torch.empty(t.shape, dtype=t.dtype)
    op.keep.append(staged)
    if copy_back:
        add_finish(op, lambda: t.copy_(staged))
    return staged


def unflatten(flat: torch.Tensor, group: list[torch.Tensor]) -> Callable[[], None]:
    def fin() -> None:
        off = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[off:off + n].view(t.shape))
            off += n

    return fin


def release_when_done(w: PycclWork, op: PendingOp) -> None:
    """Release one part of ``op`` when ``w`` completes (on the completion thread)."""
    def cb(f: torch.futures.Future[Any]) -> None:
        op.part_done(w.exception())

    w._fut.add_done_callback(cb)


# ------------------------------------------------------------------ lowering


class Lowering:
    """Builds the parts of ops for one process group (rank ``rank`` of ``size``)."""

    def __init__(self, comm: Communicator, rank: int, size: int, endpoint: _p2p.Endpoint) -> None:
        self.comm = comm
        self.rank = rank
        self.size = size
        self.endpoint = endpoint
        self._a2a_seq = 0

    # ------------------------------------------------------------ reductions

    def reduce_into(self, op: PendingOp, src: torch.Tensor, dst: torch.Tensor | None, rop: Any) -> None:
        """All-reduce contiguous ``src`` into ``dst`` (None: in place)."""
        plan = _ops.reduction_plan(rop, src.dtype)
        target = src if dst is None else dst
        if plan.gather_reduce is not None:
            gathered = torch.empty((self.size,) + tuple(src.shape), dtype=src.dtype)
            op.keep += [src, gathered]
            op.calls.append(partial(self.comm.all_gather, _ops.byte_view(src), _ops.byte_view(gathered)))
            reducer, divide, n = plan.gather_reduce, plan.avg_divisor is not None, self.size

            def fin() -> None:
                res = reducer(gathered)
                if divide:
                    res = res / n
                target.copy_(res)

            add_finish(op, fin)
            return
        assert plan.core_op is not None  # the core reduces it
        if plan.premul is not None:
            staged = src * plan.premul
            if staged.dtype != src.dtype:
                staged = staged.to(src.dtype)
            op.keep += [staged, target]
            op.calls.append(partial(self.comm.all_reduce, plan.view(staged), out=plan.view(target), op=plan.core_op))
            return
        op.keep += [src, target]
        out = None if dst is None else plan.view(dst)
        op.calls.append(partial(self.comm.all_reduce, plan.view(src), out=out, op=plan.core_op))

    def reduce_scatter_into(self, op: PendingOp, flat: torch.Tensor, out: torch.Tensor, rop: Any) -> None:
        """Reduce-scatter contiguous ``flat`` (size x out.numel elements) into contiguous ``out``."""
        plan = _ops.reduction_plan(rop, flat.dtype)
        if plan.gather_reduce is not None:
            # The core's reduce-scatter needs a reducible dtype; else all-reduce a copy and slice.
            tmp = torch.empty_like(flat)
            self.reduce_into(op, flat, tmp, rop)
            m, r = out.numel(), self.rank
            op.keep += [tmp, out]
            add_finish(op, lambda: out.view(-1).copy_(tmp.view(-1)[r * m:(r + 1) * m]))
            return
        assert plan.core_op is not None  # the core reduces it
        if plan.premul is not None:
            staged = flat * plan.premul
            flat = staged if staged.dtype == flat.dtype else staged.to(flat.dtype)
        elif overlaps(flat, out):
            flat = flat.clone()
        op.keep += [flat, out]
        op.calls.append(partial(self.comm.reduce_scatter, plan.view(flat), plan.view(out), op=plan.core_op))

    def reduce_scatter_flat(self, op: PendingOp, output: torch.Tensor, input: torch.Tensor, rop: Any) -> None:
        if output.dtype != input.dtype:
            raise ValueError(f"output dtype {output.dtype} differs from the input's {input.dtype}")
        if input.numel() != output.numel() * self.size:
            raise ValueError(f"input has {input.numel()} elements, expected world_size ({self.size}) x "
                             f"{output.numel()}")
        o = contig(op, output, copy_in=False)
        self.reduce_scatter_into(op, input.contiguous().view(-1), o.view(-1), rop)

    def reduce_scatter_list(self, op: PendingOp, out: torch.Tensor, inputs: list[torch.Tensor], rop: Any) -> None:
        for x in inputs:
            if x.dtype != out.dtype:
                raise ValueError(f"reduce_scatter: input dtype {x.dtype} differs from the output's {out.dtype}")
        flat = torch.cat([x.reshape(-1) for x in inputs])
        if all(x.numel() == out.numel() for x in inputs):
            o = contig(op, out, copy_in=False)
            self.reduce_scatter_into(op, flat, o.view(-1), rop)
            return
        # Uneven blocks: all-reduce everything, keep this rank's block.
        self.reduce_into(op, flat, None, rop)
        start = sum(x.numel() for x in inputs[: self.rank])
        n = out.numel()
        add_finish(op, lambda: out.view(-1).copy_(flat[start:start + n]) if out.is_contiguous()
                   else out.copy_(flat[start:start + n].view(out.shape)))

    def sparse_all_reduce(self, op: PendingOp, t: torch.Tensor) -> None:
        """gloo's sparse all-reduce: gather every rank's coalesced indices and
        values, add the ranks' tensors in rank order, coalesce; every rank
        gets the same tensor (what DDP needs for ``nn.Embedding(sparse=True)``).
        The sizes of the second gather depend on the first, so the whole
        exchange is one call on the runner."""
        comm, n, rank = self.comm, self.size, self.rank
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
                                 f"(per rank [nnz, ndims, sparse_dim, dense_dim, *shape] = {metas.tolist()})")
            nnz = metas[:, 0].tolist()
            width = max(nnz)
            indices = torch.zeros((local.sparse_dim(), width), dtype=torch.int64)
            indices[:, :nnz[rank]] = local.indices()
            values = torch.zeros((width, *local.values().shape[1:]), dtype=local.dtype)
            values[:nnz[rank]] = local.values()
            all_idx = torch.empty((n, *indices.shape), dtype=torch.int64)
            all_val = torch.empty((n, *values.shape), dtype=values.dtype)
            comm.all_gather(_ops.byte_view(indices), _ops.byte_view(all_idx))
            info = comm.all_gather(_ops.byte_view(values), _ops.byte_view(all_val))
            total = torch.sparse_coo_tensor(all_idx[0, :, :nnz[0]], all_val[0, :nnz[0]], local.shape)
            for r in range(1, n):
                total = total + torch.sparse_coo_tensor(all_idx[r, :, :nnz[r]], all_val[r, :nnz[r]], local.shape)
            result.append(total.coalesce())
            return info

        op.keep.append(t)
        op.calls.append(gather_all)
        add_finish(op, lambda: t.copy_(result[0]))

    # ------------------------------------------------------------ data movement

    def broadcast(self, op: PendingOp, t: torch.Tensor, root: int) -> None:
        x = contig(op, t)
        op.keep.append(x)
        op.calls.append(partial(self.comm.broadcast, _ops.byte_view(x), root=root))

    def allgather_list(self, op: PendingOp, outputs: list[torch.Tensor], t: torch.Tensor) -> None:
        for o in outputs:
            if o.dtype != t.dtype:
                raise ValueError(f"allgather: output dtype {o.dtype} differs from the input's {t.dtype}")
        x = t.contiguous()
        if all(o.numel() == t.numel() for o in outputs):
            self.gather_to(op, x, outputs)
            return
        # Uneven sizes: one broadcast per rank (the ring all-gather needs equal blocks).
        if outputs[self.rank].numel() != t.numel():
            raise ValueError(f"allgather: this rank's output slot has {outputs[self.rank].numel()} elements, "
                             f"its input {t.numel()}")
        for i, o in enumerate(outputs):
            buf = o if o.is_contiguous() else torch.empty(o.shape, dtype=o.dtype)
            if i == self.rank:
                buf.view(-1).copy_(x.view(-1))
            op.keep.append(buf)
            op.calls.append(partial(self.comm.broadcast, _ops.byte_view(buf), root=i))
            if buf is not o:
                add_finish(op, partial(o.copy_, buf))

    def gather_to(self, op: PendingOp, x: torch.Tensor, outputs: list[torch.Tensor] | None) -> None:
        """All-gather contiguous ``x`` from every rank; copy rank i's block to
        ``outputs[i]`` (None: nothing to keep here, a gather's non-root)."""
        nb = x.numel() * x.element_size()
        staging = torch.empty(self.size * nb, dtype=torch.uint8)
        op.keep += [x, staging]
        op.calls.append(partial(self.comm.all_gather, _ops.byte_view(x), staging))
        if outputs is None:
            return

        def fin() -> None:
            for i, o in enumerate(outputs):
                o.copy_(staging[i * nb:(i + 1) * nb].view(o.dtype).view(o.shape))

        add_finish(op, fin)

    def allgather_flat(self, op: PendingOp, output: torch.Tensor, t: torch.Tensor) -> None:
        if output.dtype != t.dtype:
            raise ValueError(f"output dtype {output.dtype} differs from the input's {t.dtype}")
        if output.numel() != t.numel() * self.size:
            raise ValueError(f"output has {output.numel()} elements, expected world_size ({self.size}) x "
                             f"{t.numel()}")
        out = contig(op, output, copy_in=False)
        x = t.contiguous()
        if overlaps(x, out):  # FSDP2 gathers in place: the input is a slice of the output
            x = x.clone()
        op.keep += [x, out]
        op.calls.append(partial(self.comm.all_gather, _ops.byte_view(x), _ops.byte_view(out)))

    def scatter(self, op: PendingOp, out: torch.Tensor, inputs: list[torch.Tensor], root: int) -> None:
        """A broadcast of the root's concatenated list; each rank keeps its block."""
        nb = out.numel() * out.element_size()
        staging = torch.empty(self.size * nb, dtype=torch.uint8)
        if self.rank == root:
            for i, x in enumerate(inputs):
                if x.numel() * x.element_size() != nb:
                    raise ValueError(f"scatter: input {i} has {x.numel()} elements, the output {out.numel()}")
                staging[i * nb:(i + 1) * nb].copy_(_ops.byte_view(x.contiguous()))
        op.keep += [staging, out]
        op.calls.append(partial(self.comm.broadcast, staging, root=root))
        r = self.rank
        add_finish(op, lambda: out.copy_(staging[r * nb:(r + 1) * nb].view(out.dtype).view(out.shape)))

    # -------------------------------------------------------- side channel

    def all_to_all_single(self, op: PendingOp, output: torch.Tensor, input: torch.Tensor,
                          in_rows: list[tuple[int, int]], out_rows: list[tuple[int, int]]) -> None:
        x = input.contiguous()
        o = contig(op, output, copy_in=False)
        row_in = math.prod(x.shape[1:]) if x.dim() else 1  # (dim 0 may be empty)
        row_out = math.prod(o.shape[1:]) if o.dim() else 1
        xf, of = x.reshape(-1), o.reshape(-1)
        sends = [xf[a * row_in:b * row_in] for a, b in in_rows]
        recvs = [of[a * row_out:b * row_out] for a, b in out_rows]
        op.keep += [x, o]
        self.exchange(op, sends, recvs)

    def exchange(self, op: PendingOp, sends: list[torch.Tensor], recvs: list[torch.Tensor]) -> None:
        """All-to-all over the side channel: block i of ``sends`` goes to rank i."""
        tag = self._a2a_seq
        self._a2a_seq += 1
        me = self.rank
        op.keep += sends + recvs
        if sends[me].numel() != recvs[me].numel() or sends[me].dtype != recvs[me].dtype:
            raise ValueError(f"all-to-all: this rank sends itself {sends[me].numel()} x {sends[me].dtype} "
                             f"but expects {recvs[me].numel()} x {recvs[me].dtype}")
        recvs[me].view(-1).copy_(sends[me].reshape(-1))
        for k in range(1, self.size):
            src = (me - k) % self.size
            dst = (me + k) % self.size
            op.add_part()
            self.endpoint.post_recv(_ops.byte_view(recvs[src]), src, tag, _p2p.KIND_A2A,
                                    lambda s, e: op.part_done(e))
            op.add_part()
            self.endpoint.send(_ops.byte_view(sends[dst]), dst, tag, _p2p.KIND_A2A, op.part_done)

    def send(self, op: PendingOp, t: torch.Tensor, dst: int, tag: int) -> None:
        x = t.contiguous()
        op.keep.append(x)
        op.add_part()
        self.endpoint.send(_ops.byte_view(x), dst, tag, _p2p.KIND_P2P, op.part_done)

    def recv(self, op: PendingOp, t: torch.Tensor, src: int, tag: int) -> None:
        x = contig(op, t, copy_in=False)
        op.keep.append(x)
        work = op.work

        def done(source: int, error: BaseException | None) -> None:
            work._source_rank_value = source
            op.part_done(error)

        op.add_part()
        self.endpoint.post_recv(_ops.byte_view(x), src, tag, _p2p.KIND_P2P, done)
