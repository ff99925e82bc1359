"""Mapping torch reduce ops and dtypes onto what the pyccl core reduces.

The core reduces float32/64, float16, bfloat16, int8, uint8, int16, int32 and
int64 with SUM, AVG, MIN, MAX and PROD (see ``pyccl.types``). Everything else
a torch user can ask for is mapped here:

* ``PREMUL_SUM(f)``: the input is multiplied by ``f`` into a staging buffer
  (in the tensor's dtype, like NCCL), then summed.
* ``bool``: viewed as uint8; SUM/MAX become MAX (logical or), PRODUCT/MIN
  become MIN (logical and).
* complex SUM/AVG: reduced as the real view (two floats per element).
* anything else the core cannot reduce (BAND/BOR/BXOR, complex PRODUCT,
  unsigned 16/32/64-bit ints, ...): ``Plan.gather_reduce``: every rank's input
  is all-gathered and reduced locally with torch, in rank order, so every rank
  computes the same bits. Costs world_size x the traffic of a ring reduce.

Data movement (broadcast, all-gather, all-to-all, send/recv) never looks at
the values: tensors of any dtype travel as their bytes (uint8 views).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

import torch

RedOpType = dist.ReduceOp.RedOpType
_R = dist.ReduceOp  # its members are RedOpType values

# dtypes the core reduces natively.
CORE_DTYPES = frozenset(
    {
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
    }
)

_CORE_OPS = {
    _R.SUM: "sum",
    _R.AVG: "avg",
    _R.MIN: "min",
    _R.MAX: "max",
    _R.PRODUCT: "prod",
}

_LOCAL_REDUCERS: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {
    _R.SUM: lambda g: _fold(g, torch.add),
    _R.PRODUCT: lambda g: _fold(g, torch.mul),
    _R.MIN: lambda g: _fold(g, torch.minimum),
    _R.MAX: lambda g: _fold(g, torch.maximum),
    _R.BAND: lambda g: _fold(g, torch.bitwise_and),
    _R.BOR: lambda g: _fold(g, torch.bitwise_or),
    _R.BXOR: lambda g: _fold(g, torch.bitwise_xor),
}


def _fold(g: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Left fold over dim 0 (rank order): deterministic on every rank."""
    acc = g[0].clone()
    for i in range(1, g.shape[0]):
        acc = fn(acc, g[i])
    return acc


def op_type(op: Any) -> Any:
    """The RedOpType of a ``dist.ReduceOp``, a RedOpType or an options object's reduceOp."""
    if isinstance(op, RedOpType):
        return op
    inner = getattr(op, "op", None)
    if isinstance(inner, RedOpType):
        return inner
    raise ValueError(f"pyccl: unknown reduce op {op!r}")


def premul_factor(op: Any) -> float | torch.Tensor:
    f = getattr(op, "factor", None)
    if f is None:
        raise ValueError("pyccl: PREMUL_SUM without a factor")
    factor: float | torch.Tensor = f
    return factor


def op_name(op: Any) -> str:
    return str(op_type(op)).split(".")[-1]


@dataclass
class Plan:
    """How one reduction runs on the core.

    ``view`` turns the (contiguous) user tensor into the tensor the core
    reduces; ``core_op`` is the core op's name; ``premul`` a factor to apply
    to a staging copy of the input first; ``gather_reduce`` a local reducer
    when the core cannot do it at all (then ``core_op`` is None).
    """

    core_op: str | None
    view: Callable[[torch.Tensor], torch.Tensor]
    premul: float | torch.Tensor | None = None
    gather_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    avg_divisor: int | None = None  # gather_reduce of AVG: divide after the fold


def _ident(t: torch.Tensor) -> torch.Tensor:
    return t


def _as_u8(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.uint8)


def _as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.detach())


def reduction_plan(op: Any, dtype: torch.dtype) -> Plan:
    """Decide how to reduce ``dtype`` with ``op``; raise ValueError if nobody can."""
    kind = op_type(op)
    if kind == _R.PREMUL_SUM:
        factor = premul_factor(op)
        if dtype in CORE_DTYPES and dtype.is_floating_point:
            return Plan("sum", _ident, premul=factor)
        if dtype.is_complex:
            return Plan("sum", _as_real, premul=factor)
        raise ValueError(f"pyccl: PREMUL_SUM needs a floating-point tensor, got {dtype}")
    if dtype in CORE_DTYPES and kind in _CORE_OPS:
        return Plan(_CORE_OPS[kind], _ident)
    if dtype == torch.bool:
        mapping = {_R.SUM: "max", _R.MAX: "max", _R.BOR: "max",
                   _R.PRODUCT: "min", _R.MIN: "min", _R.BAND: "min"}
        if kind in mapping:
            return Plan(mapping[kind], _as_u8)
        if kind == _R.BXOR:
            return Plan(None, _ident, gather_reduce=_LOCAL_REDUCERS[_R.BXOR])
        raise ValueError(f"pyccl: {op_name(op)} is not defined for bool tensors")
    if dtype.is_complex and kind in (_R.SUM, _R.AVG) and torch.view_as_real(
        torch.empty(0, dtype=dtype)
    ).dtype in CORE_DTYPES:
        return Plan(_CORE_OPS[kind], _as_real)
    if kind == _R.AVG and (dtype.is_floating_point or dtype.is_complex):
        return Plan(None, _ident, gather_reduce=_LOCAL_REDUCERS[_R.SUM], avg_divisor=1)
    if kind in _LOCAL_REDUCERS:
        if dtype.is_complex and kind in (_R.MIN, _R.MAX):
            raise ValueError(f"pyccl: {op_name(op)} is not defined for complex tensors")
        if kind in (_R.BAND, _R.BOR, _R.BXOR) and (dtype.is_floating_point or dtype.is_complex):
            raise ValueError(f"pyccl: {op_name(op)} needs an integer or bool tensor, got {dtype}")
        return Plan(None, _ident, gather_reduce=_LOCAL_REDUCERS[kind])
    raise ValueError(f"pyccl: cannot reduce {dtype} with {op_name(op)}")


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype): what data movement sends."""
    t = t.detach()
    if t.dtype == torch.uint8:
        return t.reshape(-1)
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    if t.dim() == 0:
        t = t.reshape(1)
    return t.reshape(-1).view(torch.uint8)
