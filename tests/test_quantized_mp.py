"""Quantized (uint8) all-reduce: bounded error, bit-identical results on every
peer, ~4x fewer bytes, and clear errors for inputs quantization cannot carry."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyccl
import pytest
from pyccl import _core

from pipe_peers import check_no_crash, run_pipe_peers


def _peer(master: str, n: int, pipe: Any) -> None:
    comm = pyccl.Communicator(master, connections=2)
    comm.connect(timeout=60)
    while comm.world_size < n:
        comm.update_topology()
    out: dict[str, Any] = {}
    rng = np.random.default_rng(100 + comm.rank)
    cases = {
        "normal": rng.standard_normal(300_000).astype(np.float32),
        "negative": -np.abs(rng.standard_normal(70_001)).astype(np.float32) - 5,
        "constant": np.full(5000, 3.25, np.float32),
        "tiny": np.array([1.5], np.float32),
    }
    for name, x in cases.items():
        exact = x.copy()
        comm.all_reduce(exact, op="avg")
        q = x.copy()
        info = comm.all_reduce(q, op="avg", quantize="uint8")
        plain = comm.all_reduce(x.copy(), op="avg")
        out[name] = {
            "hash": _core.content_hash(q.ctypes.data, q.nbytes),
            "max_err": float(np.max(np.abs(q - exact))),
            "range": float(np.ptp(exact)) if exact.size else 0.0,
            "tx": info.tx_bytes,
            "tx_plain": plain.tx_bytes,
        }
    # NaN on one peer: every peer gets a clear error, nobody hangs
    bad = np.ones(1000, np.float32)
    if comm.rank == 0:
        bad[10] = np.nan
    try:
        comm.all_reduce(bad, op="avg", quantize="uint8")
        out["nan"] = "no error"
    except pyccl.MismatchError as exc:
        out["nan"] = str(exc)
    try:
        comm.all_reduce(np.ones(4, np.float64), quantize="uint8")
    except ValueError as exc:
        out["dtype"] = str(exc)
    # Nobody leaves before everyone saw the NaN op fail: a peer that reaches
    # it after a faster one left would get PeerFailure (the group changed).
    comm.all_reduce(np.ones(1, np.float32))
    pipe.send(out)
    comm.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
def test_quantized_all_reduce(n):
    with pyccl.Master(host="127.0.0.1", port=0) as master:
        res = run_pipe_peers(_peer, n, master.address, n, timeout=100)
    check_no_crash(res)
    for name in ("normal", "negative", "constant", "tiny"):
        hashes = {out[name]["hash"] for out in res}
        assert len(hashes) == 1, (name, hashes)  # bit-identical everywhere
        for out in res:
            c = out[name]
            # each hop re-quantizes a partial sum: error grows with the ring
            # length, each step at most half a code of that chunk's range
            assert c["max_err"] <= n * max(c["range"], 1e-6) / 255 + 1e-6, (name, c)
            if name == "constant":
                assert c["max_err"] == 0.0
    big = res[0]["normal"]
    assert big["tx"] * 3.5 < big["tx_plain"], big  # ~4x fewer bytes
    for out in res:
        assert "NaN" in out["nan"], out["nan"]
        assert "float32" in out["dtype"]


def test_quantize_roundtrip_edges():
    x = np.array([-3.0, -1.0, 2.0, 7.0], np.float32)
    y = np.empty_like(x)
    assert _core.quantize_roundtrip(x.ctypes.data, y.ctypes.data, x.size)
    assert y[0] == -3.0 and abs(y[-1] - 7.0) < 1e-5
    assert np.max(np.abs(y - x)) <= (10.0 / 255) / 2 + 1e-6
    c = np.full(7, -2.5, np.float32)
    assert _core.quantize_roundtrip(c.ctypes.data, y.ctypes.data, 4)
    assert np.all(y[:4] == -2.5)
    inf = np.array([1.0, np.inf], np.float32)
    assert not _core.quantize_roundtrip(inf.ctypes.data, y.ctypes.data, 2)
