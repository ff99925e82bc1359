"""Reduction kernels of the C++ core against numpy references, for every dtype and op."""

from __future__ import annotations

import numpy as np
import pytest
from pyccl import _core
from pyccl.types import ReduceOp, as_buffer

INT_TYPES = [np.int8, np.uint8, np.int16, np.int32, np.int64]
FLOAT_TYPES = [np.float32, np.float64, np.float16]


def _reduce(dst: np.ndarray, src: np.ndarray, op: ReduceOp, final: bool = False, world: int = 1) -> np.ndarray:
    out = dst.copy()
    b = as_buffer(out)
    _core.reduce(b.ptr, as_buffer(src).ptr, b.count, b.dtype_code, int(op), final, world)
    return out


def _ref(a: np.ndarray, b: np.ndarray, op: ReduceOp, final: bool, world: int) -> np.ndarray:
    dt = a.dtype
    if dt == np.float16:
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        return _ref(a32, b32, op, final, world).astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        if op in (ReduceOp.SUM, ReduceOp.AVG):
            r = (a + b).astype(dt)
            if op == ReduceOp.AVG and final:
                if np.issubdtype(dt, np.integer):
                    # wrapped sum, then division truncating toward zero (exact, via Python ints)
                    r = np.array([(abs(int(v)) // world) * (1 if v >= 0 else -1) for v in r], dtype=np.int64).astype(dt)
                else:
                    r = (r / dt.type(world)).astype(dt)
            return r
        if op == ReduceOp.PROD:
            return (a * b).astype(dt)
        if op == ReduceOp.MIN:
            return np.minimum(a, b)
        return np.maximum(a, b)


@pytest.mark.parametrize("dtype", INT_TYPES + FLOAT_TYPES)
@pytest.mark.parametrize("op", list(ReduceOp))
@pytest.mark.parametrize("final", [False, True])
def test_kernel_matches_numpy(dtype, op, final):
    rng = np.random.default_rng(7)
    n = 1031  # odd length exercises the vector tail
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
        b = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
    else:
        a = (rng.standard_normal(n) * 100).astype(dtype)
        b = (rng.standard_normal(n) * 100).astype(dtype)
    got = _reduce(a, b, op, final, world=3)
    want = _ref(a, b, op, final, 3)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_fp16_every_value_roundtrips():
    """dst + 0 in fp32 then rounding back must give every half bit pattern back
    (NaNs stay NaN, -0 + 0 = +0 by IEEE)."""
    a = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got = _reduce(a, np.zeros_like(a), ReduceOp.SUM)
    want = (a.astype(np.float32) + np.float32(0)).astype(np.float16)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


def test_fp16_sum_rounds_once_like_numpy():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 1 << 16, 200_000, dtype=np.uint32).astype(np.uint16).view(np.float16)
    b = rng.integers(0, 1 << 16, 200_000, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got = _reduce(a, b, ReduceOp.SUM)
    with np.errstate(invalid="ignore", over="ignore"):
        want = (a.astype(np.float32) + b.astype(np.float32)).astype(np.float16)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


def _bf16_to_f32(h: np.ndarray) -> np.ndarray:
    return (h.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(f: np.ndarray) -> np.ndarray:
    u = f.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def test_bf16_sum_rounds_to_nearest_even():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    a = rng.integers(0, 1 << 16, 100_000, dtype=np.uint32).astype(np.uint16)
    b = rng.integers(0, 1 << 16, 100_000, dtype=np.uint32).astype(np.uint16)
    ta = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    tb = torch.from_numpy(b.view(np.int16).copy()).view(torch.bfloat16)
    out = ta.clone()
    _core.reduce(out.data_ptr(), tb.data_ptr(), out.numel(), 4, int(ReduceOp.SUM), False, 1)
    with np.errstate(invalid="ignore", over="ignore"):
        want = _f32_to_bf16(_bf16_to_f32(a) + _bf16_to_f32(b))
    got = out.view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(_bf16_to_f32(want))
    assert np.array_equal(np.isnan(_bf16_to_f32(got)), nan)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    # and torch agrees on the non-NaN values (torch rounds bf16 adds the same way)
    t = (ta.float() + tb.float()).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got[~nan], t[~nan])
