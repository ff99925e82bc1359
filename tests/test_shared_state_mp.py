"""Shared state across peer processes on loopback (issue: bit-exact shared state).

Every peer reports to the test through its own pipe (never a shared queue: a
SIGKILL during a write would wedge a shared queue for everyone).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyccl
import pytest

CTX = mp.get_context("spawn")


class Peers:
    """Peer processes, each with a pipe back to the test; always cleaned up."""

    def __init__(self) -> None:
        self.procs: dict[str, Any] = {}
        self.pipes: dict[str, Any] = {}

    def start(self, name: str, fn: Callable[..., None], *args: Any, env: dict[str, str] | None = None) -> None:
        r, w = CTX.Pipe(duplex=False)
        p = CTX.Process(target=_run_child, args=(fn, w, env or {}, *args), name=name)
        p.start()
        w.close()
        self.procs[name], self.pipes[name] = p, r

    def recv(self, name: str, timeout: float = 60.0) -> Any:
        if not self.pipes[name].poll(timeout):
            raise AssertionError(f"peer {name} sent nothing within {timeout} s")
        msg = self.pipes[name].recv()
        if isinstance(msg, tuple) and msg and msg[0] == "crash":
            raise AssertionError(f"peer {name} crashed:\n{msg[1]}")
        return msg

    def kill(self, name: str) -> None:
        os.kill(self.procs[name].pid, signal.SIGKILL)

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def _run_child(fn: Callable[..., None], pipe: Any, env: dict[str, str], *args: Any) -> None:
    import traceback

    os.environ.update(env)
    try:
        fn(pipe, *args)
    except BaseException:
        pipe.send(("crash", traceback.format_exc()))


def _connect(master: str, world: int) -> pyccl.Communicator:
    comm = pyccl.Communicator(master, connections=2)
    comm.connect(timeout=60)
    while comm.world_size < world:
        comm.update_topology()
    return comm


def _make_state(seed: int, n: int = 1 << 16) -> pyccl.SharedState:
    rng = np.random.default_rng(seed)
    return pyccl.SharedState(
        {
            "w": rng.standard_normal(n).astype(np.float32),
            "opt.m": np.zeros(n, np.float32),
            "step": np.zeros(1, np.int64),
        }
    )


def _update(state: pyccl.SharedState, grad: np.ndarray) -> None:
    """A deterministic update: identical inputs give identical bytes everywhere."""
    m = state["opt.m"]
    m *= np.float32(0.9)
    m += grad
    state["w"] -= np.float32(0.01) * m
    state["step"] += 1
    state.revision += 1


# ------------------------------------------------------------- update loop


def _loop_peer(pipe: Any, master: str, world: int, steps: int, seed: int) -> None:
    comm = _connect(master, world)
    state = _make_state(seed)  # every peer starts from different bytes
    for step in range(steps):
        info = comm.sync_shared_state(state)
        pipe.send(("sync", step, info.rx_bytes, info.revision, sorted(state.hashes().items())))
        g = np.full(state["w"].shape, float(comm.peer_id), np.float32)
        comm.all_reduce(g, op="avg")
        _update(state, g)
    pipe.send(("done",))
    comm.close()


@pytest.mark.timeout(120)
def test_update_loop_keeps_hashes_equal_and_transfers_only_once():
    with pyccl.Master(host="127.0.0.1", port=0) as master, Peers() as peers:
        for i in range(3):
            peers.start(f"p{i}", _loop_peer, master.address, 3, 6, i)
        for step in range(6):
            msgs = {name: peers.recv(name) for name in peers.procs}
            hashes = {name: m[4] for name, m in msgs.items()}
            assert len({tuple(h) for h in hashes.values()}) == 1, (step, hashes)
            revisions = {m[3] for m in msgs.values()}
            assert len(revisions) == 1, revisions
            rx = {name: m[2] for name, m in msgs.items()}
            if step == 0:
                # two of the three started from other bytes and fetched
                assert sum(1 for v in rx.values() if v > 0) == 2, rx
            else:
                assert all(v == 0 for v in rx.values()), (step, rx)
        for name in peers.procs:
            assert peers.recv(name) == ("done",)


# ------------------------------------------------------------------ joiner


def _member(pipe: Any, master: str, steps: int, stop: Any) -> None:
    comm = _connect(master, 2)
    state = _make_state(0)
    for step in range(steps):
        if stop.is_set():
            break
        comm.update_topology()
        info = comm.sync_shared_state(state)
        pipe.send(("sync", step, comm.world_size, info.revision, sorted(state.hashes().items()),
                   state["w"][:1000].tobytes()))
        g = np.ones(state["w"].shape, np.float32)
        comm.all_reduce(g, op="avg")
        _update(state, g)
        time.sleep(0.05)
    comm.close()


def _joiner(pipe: Any, master: str) -> None:
    comm = pyccl.Communicator(master, connections=2)
    comm.connect(timeout=60)
    state = pyccl.SharedState(
        {"w": np.zeros(1 << 16, np.float32), "opt.m": np.zeros(1 << 16, np.float32), "step": np.zeros(1, np.int64)}
    )
    comm.update_topology()
    info = comm.sync_shared_state(state)
    pipe.send(("joined", comm.world_size, info.revision, info.rx_bytes, sorted(state.hashes().items()),
               state["w"][:1000].tobytes()))
    comm.close()


@pytest.mark.timeout(120)
def test_joiner_receives_the_state_bit_exactly():
    stop = CTX.Event()
    with pyccl.Master(host="127.0.0.1", port=0) as master, Peers() as peers:
        # the members keep stepping (up to 1000 steps) until the joiner is in
        peers.start("a", _member, master.address, 1000, stop)
        peers.start("b", _member, master.address, 1000, stop)
        for _ in range(4):
            peers.recv("a"), peers.recv("b")
        peers.start("j", _joiner, master.address)
        # Keep reading the members while the joiner starts: a member blocked
        # on a full pipe would never vote the joiner in.
        seen: list[Any] = []
        deadline = time.monotonic() + 60
        while not peers.pipes["j"].poll(0.05):
            assert time.monotonic() < deadline, "the joiner sent nothing within 60 s"
            for name in ("a", "b"):
                while peers.pipes[name].poll(0):
                    m = peers.recv(name)
                    if name == "a":
                        seen.append(m)
        joined = peers.recv("j")
        stop.set()
        # the members' record of the same sync (same revision)
        ref = next((m for m in seen if m[3] == joined[2]), None)
        while ref is None:
            m = peers.recv("a")
            if m[3] == joined[2]:
                ref = m
            assert m[3] <= joined[2], (m[3], joined[2])
        assert joined[1] == 3 and ref[2] == 3
        assert joined[3] > 0
        assert joined[4] == ref[4]  # every key's hash
        assert joined[5] == ref[5]  # and a byte-for-byte sample


# ----------------------------------------------------------------- bit flip


def _flipper(pipe: Any, master: str, flip: bool) -> None:
    comm = _connect(master, 3)
    state = _make_state(0)
    comm.sync_shared_state(state)
    if flip:
        w = state["w"].view(np.uint32)
        w[123] ^= 1 << 7
    info = comm.sync_shared_state(state)
    pipe.send((info.rx_bytes, info.tx_bytes, sorted(state.hashes().items())))
    comm.close()


@pytest.mark.timeout(120)
def test_one_flipped_bit_is_repaired_and_only_that_key_moves():
    with pyccl.Master(host="127.0.0.1", port=0) as master, Peers() as peers:
        peers.start("good0", _flipper, master.address, False)
        peers.start("good1", _flipper, master.address, False)
        peers.start("bad", _flipper, master.address, True)
        res = {n: peers.recv(n) for n in peers.procs}
    w_bytes = (1 << 16) * 4
    assert res["bad"][0] == w_bytes, res["bad"]  # exactly the one key
    assert res["good0"][0] == 0 and res["good1"][0] == 0
    assert res["good0"][1] + res["good1"][1] == w_bytes  # served between the two holders
    assert res["bad"][2] == res["good0"][2] == res["good1"][2]


# --------------------------------------------------- holder dies mid-transfer


def _lone_holder(pipe: Any, master: str) -> None:
    comm = pyccl.Communicator(master, connections=2)
    comm.connect(timeout=60)
    state = pyccl.SharedState({"w": np.full(64 << 18, 7, np.float32)}, revision=5)  # 64 MiB
    comm.sync_shared_state(state)
    pipe.send(("ready", comm.peer_id))
    while comm.world_size < 2:
        comm.update_topology()
    pipe.send(("serving",))
    comm.sync_shared_state(state)  # killed in here by the test
    pipe.send(("finished?!",))


def _starving_joiner(pipe: Any, master: str) -> None:
    comm = pyccl.Communicator(master, connections=2)
    comm.connect(timeout=60)
    state = pyccl.SharedState({"w": np.zeros(64 << 18, np.float32)}, revision=0)
    comm.update_topology()
    try:
        comm.sync_shared_state(state)
        pipe.send(("synced", state.revision))
    except pyccl.CCLError as exc:
        pipe.send(("error", str(exc), state.revision))
    comm.close()


@pytest.mark.timeout(120)
def test_only_holder_killed_mid_transfer_gives_a_clear_error():
    env = {"PYCCL_TEST_SERVE_DELAY_MS": "150"}  # ~16 pieces of 4 MiB: over a second of transfer
    with pyccl.Master(host="127.0.0.1", port=0) as master, Peers() as peers:
        peers.start("holder", _lone_holder, master.address, env=env)
        assert peers.recv("holder")[0] == "ready"
        peers.start("joiner", _starving_joiner, master.address)
        assert peers.recv("holder") == ("serving",)
        time.sleep(0.6)  # the transfer is under way
        peers.kill("holder")
        res = peers.recv("joiner")
    assert res[0] == "error", res
    assert "holder" in res[1], res[1]
    assert res[2] == 0  # not marked synced


# ------------------------------------------------------------------ schema


def _schema_peer(pipe: Any, master: str, variant: str) -> None:
    comm = _connect(master, 3)
    tensors = {"w": np.ones(100, np.float32), "b": np.zeros(10, np.float32)}
    if variant == "extra_key":
        tensors["extra"] = np.zeros(3, np.float32)
    elif variant == "dtype":
        tensors["b"] = np.zeros(10, np.float64)
    elif variant == "shape":
        tensors["w"] = np.ones(101, np.float32)
    state = pyccl.SharedState(tensors)
    try:
        info = comm.sync_shared_state(state)
        pipe.send(("ok", info.revision))
    except pyccl.CCLError as exc:
        pipe.send(("error", str(exc)))
    comm.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant,key", [("extra_key", "extra"), ("dtype", "b"), ("shape", "w")])
def test_schema_mismatch_is_a_clear_error_at_the_offending_peer(variant, key):
    with pyccl.Master(host="127.0.0.1", port=0) as master, Peers() as peers:
        peers.start("a", _schema_peer, master.address, "same")
        peers.start("b", _schema_peer, master.address, "same")
        peers.start("odd", _schema_peer, master.address, variant)
        res = {n: peers.recv(n) for n in peers.procs}
    assert res["a"][0] == "ok" and res["b"][0] == "ok", res
    assert res["odd"][0] == "error", res
    assert key in res["odd"][1], res["odd"][1]


# ---------------------------------------------------------------- hashing


def test_content_hash_is_stable_and_sensitive():
    from pyccl import _core

    a = np.arange(3 << 20, dtype=np.uint8)  # spans several 1 MiB blocks
    h1 = _core.content_hash(a.ctypes.data, a.nbytes)
    assert h1 == _core.content_hash(a.copy().ctypes.data, a.nbytes)
    b = a.copy()
    b[2 << 20] ^= 1
    assert _core.content_hash(b.ctypes.data, b.nbytes) != h1
    # the block structure is part of the definition: check it from Python
    xxhash = pytest.importorskip("xxhash")
    blocks = [xxhash.xxh64_intdigest(a[i : i + (1 << 20)].tobytes(), 0) for i in range(0, a.nbytes, 1 << 20)]
    want = xxhash.xxh64_intdigest(np.array(blocks, dtype="<u8").tobytes(), a.nbytes)
    assert h1 == want
