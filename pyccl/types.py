"""Reduce ops, element types and the buffer views passed to the C++ core."""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ReduceOp(enum.IntEnum):
    """Reduction applied by all_reduce. Values match the C++ wire codes."""

    SUM = 1
    AVG = 2
    MIN = 3
    MAX = 4
    PROD = 5

    @classmethod
    def parse(cls, op: ReduceOp | str) -> ReduceOp:
        if isinstance(op, ReduceOp):
            return op
        if isinstance(op, str):
            try:
                return cls[op.upper()]
            except KeyError:
                pass
        raise ValueError(f"unknown reduce op {op!r}; use one of sum, avg, min, max, prod or pyccl.ReduceOp")


# Wire codes of element types (csrc/kernels/dtype.h).
_NUMPY_CODES = {
    np.dtype(np.float32): 1,
    np.dtype(np.float64): 2,
    np.dtype(np.float16): 3,
    np.dtype(np.int8): 5,
    np.dtype(np.uint8): 6,
    np.dtype(np.int16): 7,
    np.dtype(np.int32): 8,
    np.dtype(np.int64): 9,
}
_TORCH_NAMES = {
    "torch.float32": 1,
    "torch.float64": 2,
    "torch.float16": 3,
    "torch.bfloat16": 4,
    "torch.int8": 5,
    "torch.uint8": 6,
    "torch.int16": 7,
    "torch.int32": 8,
    "torch.int64": 9,
}
SUPPORTED_DTYPES = "float32, float64, float16, bfloat16 (torch), int8, uint8, int16, int32, int64"


@dataclass
class Buffer:
    """A contiguous CPU buffer: its address, element count and type code.

    ``owner`` keeps the array or tensor alive while the core uses the address.
    """

    ptr: int
    count: int
    itemsize: int
    dtype_code: int
    dtype_name: str
    owner: Any = field(repr=False)

    @property
    def nbytes(self) -> int:
        return self.count * self.itemsize

    def overlaps(self, other: Buffer) -> bool:
        return self.nbytes > 0 and other.nbytes > 0 and self.ptr < other.ptr + other.nbytes and other.ptr < self.ptr + self.nbytes


def _is_torch_tensor(x: Any) -> bool:
    # Only look for torch if the caller already imported it: never import it here.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def as_buffer(x: Any, what: str = "tensor", writable: bool = False) -> Buffer:
    """View a numpy array or torch CPU tensor as a Buffer, or raise ValueError saying why not."""
    if _is_torch_tensor(x):
        if x.device.type != "cpu":
            raise ValueError(
                f"{what} is on {x.device}; this pyccl build has no CUDA path: move it to the CPU first"
            )
        if not x.is_contiguous():
            raise ValueError(f"{what} must be contiguous; call .contiguous() first")
        code = _TORCH_NAMES.get(str(x.dtype))
        if code is None:
            raise ValueError(f"{what} has unsupported dtype {x.dtype}; supported: {SUPPORTED_DTYPES}")
        return Buffer(x.data_ptr(), x.numel(), x.element_size(), code, str(x.dtype).replace("torch.", ""), x)
    if isinstance(x, np.ndarray):
        if not x.flags.c_contiguous:
            raise ValueError(f"{what} must be C-contiguous; use np.ascontiguousarray first")
        if writable and not x.flags.writeable:
            raise ValueError(f"{what} is read-only")
        code = _NUMPY_CODES.get(x.dtype)
        if code is None and x.dtype.name == "bfloat16":  # ml_dtypes
            code = 4
        if code is None:
            raise ValueError(f"{what} has unsupported dtype {x.dtype}; supported: {SUPPORTED_DTYPES}")
        return Buffer(x.ctypes.data, x.size, x.itemsize, code, x.dtype.name, x)
    raise ValueError(f"{what} must be a numpy array or a torch CPU tensor, not {type(x).__name__}")
