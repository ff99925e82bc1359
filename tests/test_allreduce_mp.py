"""all_reduce across real peer processes on loopback: every dtype and op.

Each test starts a master in this process and ``n`` peer processes (spawn).
The peers run the same list of cases in the same order; for every case each
peer builds its input from (case, peer index) alone, so this process can build
all inputs too and compute the exact expected result. Peers send back sha1
digests of their results (never the arrays) and their ReduceInfo.

Exactness: sums, averages and products use small integer values, so every
partial result is exact and the answer does not depend on the ring's order of
additions; min/max use arbitrary values (exact anyway). Bit-identity across
peers for inexact float sums is checked separately with random floats.
"""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Any

import numpy as np
import pytest

from mp_helpers import PeerProcs, digest, join_group, running_master

try:
    import torch

    HAVE_TORCH = True
except ImportError:  # torch is an optional extra
    HAVE_TORCH = False

NP_DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64"]
DTYPES = NP_DTYPES + (["bfloat16"] if HAVE_TORCH else [])
OPS = ["sum", "avg", "min", "max", "prod"]
FLOATS = {"float32", "float64", "float16", "bfloat16"}
BIG_BYTES = 3 << 20  # "a few MiB"


# ------------------------------------------------------------------ the cases


def sizes_for(n: int, dtype: str) -> list[int]:
    item = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    small = sorted({1, max(1, n - 1), 7, 1001})  # n - 1: fewer elements than peers
    return small + [BIG_BYTES // item + 3]  # odd, not a multiple of n


def make_cases(n: int) -> list[tuple[str, str, str, int, str]]:
    """(key, dtype, op, count, mode) in the order every peer runs them."""
    cases = []
    for dtype in DTYPES:
        for op in OPS:
            sizes = sizes_for(n, dtype)
            for count in sizes[:-1]:
                for mode in ("inplace", "out"):
                    cases.append((f"{dtype}/{op}/{count}/{mode}", dtype, op, count, mode))
            mode = "inplace" if op in ("sum", "min", "prod") else "out"
            cases.append((f"{dtype}/{op}/{sizes[-1]}/{mode}", dtype, op, sizes[-1], mode))
    return cases


def make_random_cases() -> list[tuple[str, str, str, int, str]]:
    """Random (inexact) floats: only bit-identity across peers is exact."""
    return [
        (f"rand/{dtype}/{op}/{count}/{mode}", dtype, op, count, mode)
        for dtype in [d for d in DTYPES if d in FLOATS]
        for op in ("sum", "avg")
        for count, mode in ((257, "out"), (100_003, "inplace"))
    ]


def source_values(key: str, dtype: str, op: str, count: int, idx: int, n: int) -> np.ndarray:
    """Peer ``idx``'s input for a case, as a numpy array of the storage dtype
    (float32 holding bfloat16-exact values for bfloat16)."""
    seed = int(hashlib.sha1(key.encode()).hexdigest()[:15], 16)
    rng = np.random.default_rng([seed, idx, 12345])
    np_dtype = np.dtype("float32" if dtype == "bfloat16" else dtype)
    if key.startswith("rand/"):
        return (rng.standard_normal(count) * 10).astype(np_dtype)
    is_int = np.issubdtype(np_dtype, np.integer)
    if op in ("sum", "avg"):
        if dtype in ("int8", "uint8"):
            hi = np.iinfo(np_dtype).max // n
        elif dtype == "bfloat16":
            hi = 256 // n  # integers up to 256 are exact in bfloat16
        elif dtype == "float16":
            hi = 2048 // n
        else:
            hi = 1000
        lo = 0 if dtype == "uint8" else -hi
        return rng.integers(lo, hi, count, endpoint=True).astype(np_dtype)
    if op == "prod":
        choices = [1, 2, 3] if dtype == "uint8" else [-2, -1, 1, 2]
        return rng.choice(np.array(choices), count).astype(np_dtype)
    # min / max: arbitrary values over the whole range
    if is_int:
        info = np.iinfo(np_dtype)
        return rng.integers(info.min, info.max, count, dtype=np_dtype, endpoint=True)
    return (rng.standard_normal(count) * 1000).astype(np_dtype)


def to_bf16(a: np.ndarray) -> Any:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16)


def reference(dtype: str, op: str, inputs: list[np.ndarray], n: int) -> Any:
    """The exact result (numpy array, or a bfloat16 torch tensor)."""
    if dtype == "bfloat16":
        f32 = reference("float32", op, inputs, n)  # all partial results are bf16-exact
        return to_bf16(f32)
    dt = np.dtype(dtype)
    with np.errstate(over="ignore"):
        if op == "min":
            return functools.reduce(np.minimum, inputs)
        if op == "max":
            return functools.reduce(np.maximum, inputs)
        if op == "prod":
            return functools.reduce(np.multiply, inputs).astype(dt)
        total = functools.reduce(np.add, inputs).astype(dt)  # exact by construction
        if op == "sum":
            return total
        if np.issubdtype(dt, np.integer):  # avg: integer division, truncating toward zero
            t = total.astype(np.int64)
            return (np.sign(t) * (np.abs(t) // n)).astype(dt)
        if dt == np.float64:
            return total / np.float64(n)
        # float16 (and bfloat16 above): divided in float32, rounded once to storage
        return (total.astype(np.float32) / np.float32(n)).astype(dt)


def make_input(key: str, dtype: str, op: str, count: int, idx: int, n: int) -> Any:
    src = source_values(key, dtype, op, count, idx, n)
    return to_bf16(src) if dtype == "bfloat16" else src


# ---------------------------------------------------------------- peer side


def _copy(x: Any) -> Any:
    return x.clone() if not isinstance(x, np.ndarray) else x.copy()


def _empty_like(x: Any) -> Any:
    return torch.empty_like(x) if not isinstance(x, np.ndarray) else np.empty_like(x)


def _same_bits(a: Any, b: Any) -> bool:
    return digest(a) == digest(b)


def matrix_peer(idx: int, q: Any, address: str, n: int) -> None:
    import pyccl

    comm = join_group(address, n, connections=2, name=f"matrix-{idx}")
    digests: dict[str, str] = {}
    infos: dict[str, tuple] = {}
    raw: dict[str, bytes] = {}
    t0 = time.perf_counter()
    for key, dtype, op, count, mode in make_cases(n) + make_random_cases():
        comm.update_topology()  # every iteration, as a training loop would
        x = make_input(key, dtype, op, count, idx, n)
        before = _copy(x)
        if mode == "inplace":
            info = comm.all_reduce(x, op=op)
            res = x
        else:
            res = _empty_like(x)
            info = comm.all_reduce(x, out=res, op=pyccl.ReduceOp[op.upper()])
            assert _same_bits(x, before), f"{key}: all_reduce(out=) modified its input"
        digests[key] = digest(res)
        infos[key] = (info.world_size, info.tx_bytes, info.rx_bytes, info.seconds, info.epoch, tuple(info.peers),
                      comm.epoch, tuple(comm.peers))
        if key.startswith("rand/") and count < 1000:
            raw[key] = (res.view(torch.int16).numpy() if dtype == "bfloat16" else res).tobytes()
    cases_s = time.perf_counter() - t0

    # ---- misuse: out= of the wrong size or dtype is refused locally, before any traffic
    misuse: dict[str, str] = {}
    x = np.arange(1001, dtype=np.float32)
    for name, bad_out in (("size", np.empty(1000, np.float32)), ("dtype", np.empty(1001, np.float64))):
        try:
            comm.all_reduce(x, out=bad_out)
        except ValueError as exc:
            misuse[name] = str(exc)
        else:
            raise AssertionError(f"all_reduce with an out= of the wrong {name} did not raise ValueError")
    assert np.array_equal(x, np.arange(1001, dtype=np.float32))

    # ---- mismatches across peers: peer 0 disagrees; every peer must get MismatchError
    mismatches = {
        "count": lambda: np.ones(1000 if idx == 0 else 1001, np.float32),
        "count-tiny": lambda: np.ones(1 if idx == 0 else 4099, np.float32),
        # small all-reduces take the gather path, large ones the ring: a
        # disagreement across that line, including one where the gathered
        # size of one equals the other's size at n = 2 (48 KiB vs 96 KiB)
        "count-path": lambda: np.ones(1024 if idx == 0 else 1 << 16, np.float32),
        "count-gathered-size": lambda: np.ones(12288 if idx == 0 else 24576, np.float32),
        "dtype": lambda: np.ones(1001, np.int32 if idx == 0 else np.float32),
        "op": None,  # same buffer, op differs
    }
    mismatch_report: dict[str, tuple] = {}
    for name, make in mismatches.items():
        comm.update_topology()
        if make is None:
            buf, op = np.ones(1001, np.float32), ("max" if idx == 0 else "sum")
        else:
            buf, op = make(), "sum"
        before = buf.copy()
        t = time.perf_counter()
        try:
            comm.all_reduce(buf, op=op)
        except pyccl.MismatchError as exc:
            mismatch_report[name] = (
                type(exc).__name__, isinstance(exc, pyccl.CCLError), isinstance(exc, ValueError), str(exc),
                time.perf_counter() - t, np.array_equal(buf, before),
            )
        except BaseException as exc:
            mismatch_report[name] = (type(exc).__name__, False, False, str(exc), time.perf_counter() - t, False)
        else:
            mismatch_report[name] = ("no error", False, False, "", time.perf_counter() - t, False)
        # The group keeps working: a correct all-reduce right after.
        comm.update_topology()
        y = np.full(1001, float(idx + 1), np.float64)
        info = comm.all_reduce(y)
        want = n * (n + 1) / 2
        assert info.world_size == n and comm.world_size == n, (name, info, comm.world_size)
        assert np.all(y == want), f"after the {name} mismatch: got {y[:4]}, want {want}"

    q.put(("result", idx, {
        "peer_id": comm.peer_id, "digests": digests, "infos": infos, "raw": raw, "misuse": misuse,
        "mismatch": mismatch_report, "cases_s": cases_s,
    }))
    comm.close()


# ---------------------------------------------------------------- test side


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.timeout(120)
def test_all_reduce_every_dtype_and_op(n: int) -> None:
    cases = make_cases(n)
    rand_cases = make_random_cases()
    with running_master() as master, PeerProcs() as procs:
        for i in range(n):
            procs.start(i, matrix_peer, master.address, n)
        # Compute the expected digests while the peers work.
        expected = {}
        for key, dtype, op, count, _mode in cases:
            inputs = [source_values(key, dtype, op, count, i, n) for i in range(n)]
            expected[key] = digest(reference(dtype, op, inputs, n))
        res = procs.gather("result", range(n), timeout=60)
        procs.join(range(n), timeout=20)

    ids = sorted(r["peer_id"] for r in res.values())
    assert len(set(ids)) == n

    # 1. every exact case equals the reference on every peer
    wrong = []
    for key, *_ in cases:
        for i in range(n):
            if res[i]["digests"][key] != expected[key]:
                wrong.append(f"{key} on peer {i}")
    assert not wrong, f"{len(wrong)} results differ from the reference, e.g. {wrong[:10]}"

    # 2. random floats: bit-identical across peers, and close to the float64 answer
    for key, dtype, op, count, _mode in rand_cases:
        got = {res[i]["digests"][key] for i in range(n)}
        assert len(got) == 1, f"{key}: peers disagree on the result bits"
        if key in res[0]["raw"]:
            inputs = [source_values(key, dtype, op, count, i, n).astype(np.float64) for i in range(n)]
            want = sum(inputs) / (n if op == "avg" else 1)
            raw = res[0]["raw"][key]
            if dtype == "bfloat16":
                got_v = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                got_v = np.frombuffer(raw, np.dtype(dtype))
            tol = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-2, "bfloat16": 5e-2}[dtype]
            np.testing.assert_allclose(got_v.astype(np.float64), want, rtol=tol, atol=tol * 40 * n)

    # 3. ReduceInfo
    for key, _dtype, _op, count, _mode in cases + rand_cases:
        rows = [res[i]["infos"][key] for i in range(n)]
        for ws, tx, rx, secs, epoch, peers, comm_epoch, comm_peers in rows:
            assert ws == n, (key, rows)
            assert secs > 0, (key, rows)
            assert epoch == comm_epoch and epoch >= 1, (key, rows)
            assert tuple(peers) == tuple(comm_peers) and sorted(peers) == ids, (key, rows)
            if count >= n:
                assert tx > 0 and rx > 0, (key, rows)
        # every byte sent is received by someone; all peers ran in one epoch
        assert sum(r[1] for r in rows) == sum(r[2] for r in rows), (key, rows)
        assert len({r[4] for r in rows}) == 1, (key, rows)

    # 4. misuse
    for i in range(n):
        m = res[i]["misuse"]
        assert "1000" in m["size"] and "1001" in m["size"], m
        assert "float64" in m["dtype"] and "float32" in m["dtype"], m
        for name, (tname, is_ccl, is_value, msg, secs, untouched) in res[i]["mismatch"].items():
            assert tname == "MismatchError", f"peer {i}, {name} mismatch: got {tname}: {msg}"
            assert is_ccl and is_value, (i, name)
            assert "disagree" in msg or "mismatch" in msg.lower(), (i, name, msg)
            assert secs < 10, f"peer {i}, {name} mismatch took {secs:.1f} s to fail"
            assert untouched, f"peer {i}: input changed by the failed {name} all-reduce"
        assert "size" in res[i]["mismatch"]["count"][3], res[i]["mismatch"]["count"]
    print(f"n={n}: {len(cases) + len(rand_cases)} cases in "
          + ", ".join(f"{res[i]['cases_s']:.1f}" for i in range(n)) + " s")


# ------------------------------------------- epoch changes in quick succession


def mismatch_loop_peer(idx: int, q: Any, address: str, n: int, reps: int) -> None:
    import pyccl

    comm = join_group(address, n, connections=2, name=f"mismatch-{idx}")
    outcomes = {"mismatch": 0}
    for r in range(reps):
        # Peer 0 passes one element fewer: every peer must get MismatchError,
        # and the master starts a new epoch (same members) right away.
        bad = np.ones(1000 if idx == 0 else 1001, np.float32)
        try:
            comm.all_reduce_async(bad).wait(timeout=15)
        except pyccl.MismatchError:
            outcomes["mismatch"] += 1
        # The first op of the new epoch must complete, and be right.
        y = np.full(1001, float(idx + 1))
        try:
            info = comm.all_reduce_async(y).wait(timeout=15)
        except pyccl.Timeout:
            raise AssertionError(
                f"iteration {r}: the first all_reduce of epoch {comm.epoch} (after a mismatch) hung for 15 s"
            ) from None
        assert info.world_size == n and np.all(y == n * (n + 1) / 2), (r, info, y[:3])
    q.put(("result", idx, outcomes))
    comm.close()


@pytest.mark.timeout(120)
def test_first_op_after_an_epoch_change_never_hangs() -> None:
    """Many epoch changes back to back (each mismatch ends the epoch); the
    first op of each new epoch must complete. A neighbour that learns the new
    epoch first connects and sends at once, so this races the receiver's own
    switch to that epoch."""
    n, reps = 2, 300
    with running_master() as master, PeerProcs() as procs:
        for i in range(n):
            procs.start(i, mismatch_loop_peer, master.address, n, reps)
        res = procs.gather("result", range(n), timeout=100)
        procs.join(range(n), timeout=20)
    for i in range(n):
        assert res[i]["mismatch"] == reps, res


# ---------------------------------------------- an empty tensor on one peer


def empty_mismatch_peer(idx: int, q: Any, address: str, n: int, reps: int) -> None:
    import pyccl

    comm = join_group(address, n, connections=2, name=f"empty-{idx}")
    outcomes = []
    for r in range(reps):
        for empty_idx in range(n):
            comm.update_topology()
            x = np.ones(0 if idx == empty_idx else 5, np.float32)
            try:
                comm.all_reduce_async(x).wait(timeout=10)
                outcomes.append((r, empty_idx, "completed"))
            except pyccl.MismatchError as exc:
                outcomes.append((r, empty_idx, "MismatchError"))
                assert "disagree" in str(exc) or "size" in str(exc), str(exc)
            except pyccl.Timeout:
                outcomes.append((r, empty_idx, "hung for 10 s"))
                q.put(("result", idx, outcomes))
                return  # the hung op keeps a thread: let the test kill us
            y = np.full(3, float(idx + 1))
            comm.all_reduce_async(y).wait(timeout=10)
            assert np.all(y == n * (n + 1) / 2)
    q.put(("result", idx, outcomes))
    comm.close()


@pytest.mark.timeout(60)
def test_empty_tensor_on_one_peer_is_a_mismatch_not_a_hang() -> None:
    """One peer passes 0 elements, the other 5: every peer must get
    MismatchError (like any size mismatch), never hang."""
    n, reps = 2, 3
    with running_master() as master, PeerProcs() as procs:
        for i in range(n):
            procs.start(i, empty_mismatch_peer, master.address, n, reps)
        res = procs.gather("result", range(n), timeout=45)
    for i in range(n):
        bad = [o for o in res[i] if o[2] != "MismatchError"]
        assert not bad, f"peer {i}: {bad} (all outcomes: {res[i]})"


# ------------------------------------------------- empty tensors everywhere


def all_empty_peer(idx: int, q: Any, address: str, n: int) -> None:
    """Every collective with zero elements on every peer, numpy and torch
    (whose empty tensors may have a null data pointer)."""
    import pyccl

    comm = join_group(address, n, connections=2, name=f"all-empty-{idx}")
    kinds: list[Any] = [np.zeros(0, np.float32), np.zeros(0, np.int64)]
    try:
        import torch

        kinds += [torch.empty(0), torch.empty(0, dtype=torch.bfloat16)]
    except ImportError:
        pass
    done = []
    for x in kinds:
        out = x[:0].copy() if isinstance(x, np.ndarray) else x.clone()
        calls = {
            "all_reduce": lambda x=x: comm.all_reduce_async(x),
            "all_reduce out=": lambda x=x, out=out: comm.all_reduce_async(x, out=out),
            "all_reduce avg": lambda x=x: comm.all_reduce_async(x, op="avg"),
            "all_gather": lambda x=x, out=out: comm.all_gather_async(x, out),
            "reduce_scatter": lambda x=x, out=out: comm.reduce_scatter_async(x, out),
            "broadcast": lambda x=x: comm.broadcast_async(x, root=n - 1),
        }
        for name, call in calls.items():
            try:
                info = call().wait(timeout=10)
            except pyccl.Timeout:
                q.put(("result", idx, {"hung": f"{name} {x.dtype}"}))
                return  # the hung op keeps a thread: let the test kill us
            assert info.world_size == n and info.tx_bytes == 0 and info.rx_bytes == 0, (name, info)
            done.append(f"{name} {x.dtype}")
    y = np.full(3, float(idx + 1))  # the group still works afterwards
    comm.all_reduce(y)
    assert np.all(y == n * (n + 1) / 2)
    q.put(("result", idx, {"done": done}))
    comm.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("n", [2, 3])
def test_every_collective_on_empty_tensors_completes(n: int) -> None:
    with running_master() as master, PeerProcs() as procs:
        for i in range(n):
            procs.start(i, all_empty_peer, master.address, n)
        res = procs.gather("result", range(n), timeout=75)
    for i in range(n):
        assert "hung" not in res[i], f"peer {i}: {res[i]['hung']} did not complete within 10 s"
        assert len(res[i]["done"]) >= 12, res[i]
