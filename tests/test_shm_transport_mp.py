"""Ring links between peers on one host go through shared memory (issue 15).

* every collective, dtype and op gives the same bits over shared memory as
  over TCP (``PYCCL_TRANSPORT=tcp``), and the shared-memory path was really
  taken (or really not);
* a group whose peers sit in different network namespaces (other "hosts")
  mixes shared-memory and TCP links and still reduces exactly;
* rings are anonymous memory: nothing appears in /dev/shm, and a peer keeps
  only the rings of its current links mapped.

SIGKILL and SIGSTOP of a same-host peer mid-op run in test_faults_mp.py,
once per transport.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import numpy as np
import pyccl
import pytest

from mp_helpers import PeerProcs, digest, running_master
from pipe_peers import check_no_crash, run_pipe_peers

DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64"]
OPS = ["sum", "avg", "max", "min", "prod"]
# elements: the small all-reduce (gather), a few chunks, many chunks (> 1 MiB for float32)
SIZES = [1, 1000, 70001, 300007]


def ring_mappings() -> int:
    """This process's mappings of shared-memory rings (memfd "pyccl-ring")."""
    with open("/proc/self/maps") as f:
        return sum("memfd:pyccl-ring" in line for line in f)


def _input(seed: int, count: int, dtype: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype.startswith("float"):
        return rng.standard_normal(count).astype(dtype)
    return rng.integers(-3 if dtype[0] == "i" else 0, 4, count).astype(dtype)


def _matrix_peer(master: str, n: int, transport: str, pipe: Any) -> None:
    comm = pyccl.Communicator(master, connections=2, transport=transport)
    comm.connect(timeout=60)
    while comm.world_size < n:
        if not comm.update_topology():
            time.sleep(0.005)
    r = comm.rank
    digests: dict[str, str] = {}
    intact = True
    for dtype in DTYPES:
        for count in SIZES:
            x = _input(1000 * r + count, count, dtype)
            for op in OPS:
                if op == "avg" and not dtype.startswith("float"):
                    continue
                xc = x.copy()
                out = np.empty_like(x)
                comm.all_reduce(x, out=out, op=op)
                intact &= bool(np.array_equal(x, xc))
                digests[f"ar {dtype} {count} {op}"] = digest(out)
                y = x.copy()
                comm.all_reduce(y, op=op)  # in place: the scratch + commit path
                digests[f"ar-inplace {dtype} {count} {op}"] = digest(y)
            m = max(1, count // n)
            rs = np.empty(m, dtype)
            comm.reduce_scatter(_input(7 + r, m * n, dtype), rs, op="sum")
            digests[f"rs {dtype} {count}"] = digest(rs)
            g = np.empty(m * n, dtype)
            comm.all_gather(x[:m].copy() if count >= m else x, g)
            digests[f"ag {dtype} {count}"] = digest(g)
            b = x.copy()
            comm.broadcast(b, root=n - 1)
            digests[f"bc {dtype} {count}"] = digest(b)
    report = {"rank": r, "digests": digests, "intact": intact, "shm": comm._dp.shm_links_accepted,
              "rings": ring_mappings()}
    comm.all_reduce(np.ones(1, np.float32))  # nobody leaves (a new epoch) before everyone looked
    pipe.send(report)
    comm.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n, ring", [(2, None), (3, None), (3, "65536")])
def test_shared_memory_results_are_bit_identical_to_tcp(n: int, ring: str | None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """ring: PYCCL_SHM_RING_BYTES, the smallest ring: frames larger than the
    ring, and rings that fill up while reader threads forward (which must
    then queue instead of waiting on a full ring, or the peers' readers
    would wait on each other in a cycle)."""
    if ring is not None:
        monkeypatch.setenv("PYCCL_SHM_RING_BYTES", ring)  # the spawned peers inherit it
    runs = {}
    for transport in ("auto", "tcp"):
        with running_master() as master:
            res = run_pipe_peers(_matrix_peer, n, master.address, n, transport, timeout=200)
        check_no_crash(res)
        runs[transport] = {r["rank"]: r for r in res}
    for rank in range(n):
        shm, tcp = runs["auto"][rank], runs["tcp"][rank]
        assert shm["intact"] and tcp["intact"], "an out-of-place op changed its input"
        # auto: the predecessor's links came over shared memory (2 connections, one epoch at least)
        assert shm["shm"] >= 2 and shm["rings"] >= 2, shm["shm"]
        assert tcp["shm"] == 0 and tcp["rings"] == 0, tcp["shm"]
        diff = [k for k in tcp["digests"] if shm["digests"][k] != tcp["digests"][k]]
        assert not diff, f"rank {rank}: {len(diff)} results differ between shared memory and TCP, e.g. {diff[:5]}"
    # and every rank holds the same all-reduce result
    for k in runs["auto"][0]["digests"]:
        if k.startswith("ar"):
            assert len({runs["auto"][r]["digests"][k] for r in range(n)}) == 1, k


# ------------------------------------------------------------ mixed hosts

NETNS = f"pyccl-t15-{os.getpid()}"
ROOT_IP, NS_IP = "10.215.0.1", "10.215.0.2"


def _have_netns() -> bool:
    if os.geteuid() != 0:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


def _enter_netns(name: str) -> None:
    """Move this (still single-threaded) process into network namespace ``name``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "setns")
    os.close(fd)


def _mixed_peer(idx: int, q: Any, master: str, n: int, netns: str | None, transport: str = "auto") -> None:
    if netns:
        _enter_netns(netns)
    comm = pyccl.Communicator(master, connections=2, order=idx, transport=transport)
    comm.connect(timeout=60)
    while comm.world_size < n:
        if not comm.update_topology():
            time.sleep(0.005)
    x = np.arange(300007, dtype=np.float32) * np.float32(idx + 1)
    out = np.empty_like(x)
    comm.all_reduce(x, out=out)
    deadline = time.monotonic() + 5  # rings of earlier epochs (the group grew peer by peer) go away
    while ring_mappings() > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    report = {"rank": comm.rank, "ok": bool(np.array_equal(out, x / (idx + 1) * sum(range(1, n + 1)))),
              "shm": comm._dp.shm_links_accepted, "rings": ring_mappings()}
    comm.all_reduce(np.ones(1, np.float32))  # nobody leaves (a new epoch) before everyone looked
    q.put(("result", idx, report))
    comm.close()


@pytest.fixture
def netns() -> Any:
    if not _have_netns():
        pytest.skip("needs root and ip netns")

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", NETNS)
    try:
        ip("link", "add", f"v{os.getpid() % 100000}a", "type", "veth", "peer", "name", f"v{os.getpid() % 100000}b")
        ip("link", "set", f"v{os.getpid() % 100000}b", "netns", NETNS)
        ip("addr", "add", f"{ROOT_IP}/30", "dev", f"v{os.getpid() % 100000}a")
        ip("link", "set", f"v{os.getpid() % 100000}a", "up")
        ip("-n", NETNS, "addr", "add", f"{NS_IP}/30", "dev", f"v{os.getpid() % 100000}b")
        ip("-n", NETNS, "link", "set", f"v{os.getpid() % 100000}b", "up")
        ip("-n", NETNS, "link", "set", "lo", "up")
        yield NETNS
    finally:
        subprocess.run(["ip", "link", "del", f"v{os.getpid() % 100000}a"], capture_output=True)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


@pytest.mark.timeout(120)
def test_mixed_same_host_and_other_host_peers(netns: str) -> None:
    """Peers 0 and 1 share this namespace (one host), peer 2 is in another
    (another host): the ring 0 -> 1 -> 2 -> 0 has one shared-memory link
    and two TCP links, and reduces exactly."""
    n = 3
    master = pyccl.Master(host=ROOT_IP, port=0)
    master.start()
    try:
        with PeerProcs() as procs:
            for i in range(n):
                procs.start(i, _mixed_peer, f"{ROOT_IP}:{master.port}", n, netns if i == 2 else None)
            res = procs.gather("result", range(n), timeout=90)
            procs.join(range(n), timeout=20)
    finally:
        master.stop()
    assert all(res[i]["ok"] for i in range(n)), res
    assert [res[i]["rank"] for i in range(n)] == [0, 1, 2], res
    _check_one_shm_link(res)


def _check_one_shm_link(res: dict[int, Any]) -> None:
    """In the last epoch only 0 -> 1 is a shared-memory link (2 connections:
    peer 0 maps the two rings it writes, peer 1 the two it reads); peer 2's
    links are TCP both ways, in that epoch and in every earlier one."""
    assert res[1]["shm"] >= 2, res
    assert res[2]["shm"] == 0 and res[2]["rings"] == 0, res
    assert res[0]["rings"] == 2 and res[1]["rings"] == 2, res


@pytest.mark.timeout(120)
def test_a_peer_forced_to_tcp_among_same_host_peers() -> None:
    """Peer 2 runs with transport="tcp" (PYCCL_TRANSPORT=tcp): it sends no
    host id, so neither its predecessor nor itself asks for shared memory,
    while 0 -> 1 still does."""
    n = 3
    with running_master() as master, PeerProcs() as procs:
        for i in range(n):
            procs.start(i, _mixed_peer, master.address, n, None, "tcp" if i == 2 else "auto")
        res = procs.gather("result", range(n), timeout=90)
        procs.join(range(n), timeout=20)
    assert all(res[i]["ok"] for i in range(n)), res
    assert [res[i]["rank"] for i in range(n)] == [0, 1, 2], res
    _check_one_shm_link(res)


def test_no_shared_memory_segment_is_left_in_dev_shm() -> None:
    """Rings are memfd mappings: never a file in /dev/shm (checked after the
    tests above, whose peers exited or were killed)."""
    leftovers = [f for f in os.listdir("/dev/shm") if "pyccl" in f]
    assert not leftovers, leftovers
