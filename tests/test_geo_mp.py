"""optimize_topology() on an emulated 2-region geography (compiled link emulator).

Six peers join in alternating region order (a, b, a, b, ...), so the join
order crosses regions on every ring link. After optimize_topology() the ring
must cross regions exactly twice; a joiner that names its region is placed
inside it (still two crossings), and after a SIGKILL the survivors keep a
ring that crosses twice and all-reduce exactly.
"""

from __future__ import annotations

import signal
import socket
import time

import numpy as np
import pytest

from mp_helpers import PeerProcs

linkemu = pytest.importorskip("pyccl.stress.linkemu")
from pyccl.stress.geography import Geography, peer_ip  # noqa: E402

try:
    linkemu.find_binary()
except linkemu.EmulatorError as exc:  # pragma: no cover - a build without the emulator
    pytest.skip(str(exc), allow_module_level=True)

GEO = Geography.from_mapping({
    "regions": {"a": {"delay": "0.5ms", "rate": "300MB/s"}, "b": {"delay": "0.5ms", "rate": "300MB/s"}},
    "between": [{"regions": ["a", "b"], "delay": "15ms", "window": "256KiB", "rate": "20MB/s", "shared": True}],
})


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _peer(idx: int, q, master: str, ip: str, port: int, adv: int, region: str, n: int, joiner: bool) -> None:
    import pyccl

    comm = pyccl.Communicator(master, connections=2, data_port=port, data_host=ip, advertise=("127.0.0.1", adv),
                              region=region, name=f"p{idx}")
    comm.connect(timeout=60)
    q.put(("hello", idx, (comm.peer_id, region)))
    if not joiner:
        comm.wait_for_world(n, 60)
        # wait_for_world() votes a different number of times on each peer: a
        # collective lines the program positions up again.
        comm.all_reduce(np.zeros(4, np.float32))
        q.put(("before", idx, comm.peers))
        comm.optimize_topology(seconds=0.1, max_bytes=8 << 20)
        q.put(("optimized", idx, comm.peers))
        comm.wait_for_world(n + 1, 60)  # the joiner
    q.put(("joined", idx, comm.peers))
    x = np.zeros(4096, np.float32)
    ok_after_loss = 0
    deadline = time.monotonic() + 60
    while ok_after_loss < 3 and time.monotonic() < deadline:
        x[:] = comm.peer_id
        try:
            info = comm.all_reduce(x)
        except pyccl.PeerFailure:
            continue
        assert np.all(x == sum(info.peers)), (x[:3], info.peers)
        if info.world_size == n:
            ok_after_loss += 1
        time.sleep(0.02)
    q.put(("survived", idx, comm.peers))
    comm.close()


def crossings(ring, region_of) -> int:
    return sum(1 for i in range(len(ring)) if region_of[ring[i]] != region_of[ring[(i + 1) % len(ring)]])


@pytest.mark.timeout(180)
def test_optimized_ring_crosses_regions_twice_and_survives_joins_and_kills() -> None:
    import pyccl

    n = 6
    emu = linkemu.LinkEmulator(threads=2)
    with pyccl.Master(host="127.0.0.1", port=0) as master, PeerProcs() as procs:
        try:
            specs = []
            for i in range(n + 1):
                ip = peer_ip(i)
                port = free_port(ip)
                specs.append((f"p{i}", GEO.region_of(i), ip, port, emu.open(port, f"p{i}", upstream_host=ip)))
            GEO.apply(emu, [(name, region, ip) for name, region, ip, _, _ in specs])
            hellos = {}
            for i in range(n):  # one after the other: the join order alternates a, b, a, b, ...
                name, region, ip, port, adv = specs[i]
                procs.start(i, _peer, master.address, ip, port, adv, region, n, False)
                hellos.update(procs.gather("hello", [i], 60))
            region_of = {pid: region for pid, region in hellos.values()}
            before = procs.gather("before", range(n), 90)
            assert crossings(before[0], region_of) == n, (before[0], region_of)
            optimized = procs.gather("optimized", range(n), 90)
            ring = optimized[0]
            assert all(r == ring for r in optimized.values())
            assert crossings(ring, region_of) == 2, (ring, region_of)
            # A joiner of region "a" is placed inside its region.
            pid_of_joiner: int | None = None
            name, region, ip, port, adv = specs[n]
            procs.start(n, _peer, master.address, ip, port, adv, region, n, True)
            joined: dict[int, tuple[int, ...]] = {}
            while len(joined) < n + 1 or pid_of_joiner is None:
                kind, idx, payload = procs.get(90, ("hello", "joined"))
                if kind == "hello":
                    pid_of_joiner = payload[0]
                    region_of[pid_of_joiner] = region
                else:
                    joined[idx] = payload
            ring = joined[0]
            assert len(ring) == n + 1 and crossings(ring, region_of) == 2, (ring, region_of)
            # SIGKILL one member while all-reduces run; the survivors go on over a ring that still crosses twice.
            time.sleep(0.5)
            procs.signal(1, signal.SIGKILL)
            procs.expected_dead.add(1)
            survived = procs.gather("survived", [i for i in range(n + 1) if i != 1], 90)
            ring = next(iter(survived.values()))
            assert len(ring) == n and all(r == ring for r in survived.values())
            assert crossings(ring, region_of) == 2, (ring, region_of)
        finally:
            emu.close()


def _auto_peer(idx: int, q, master: str, ip: str, port: int, adv: int, n: int) -> None:
    import pyccl

    comm = pyccl.Communicator(master, connections="auto", data_port=port, data_host=ip,
                              advertise=("127.0.0.1", adv))
    comm.connect(timeout=60)
    comm.wait_for_world(n, 60)
    comm.all_reduce(np.zeros(4, np.float32))
    before = comm.link_connections
    comm.optimize_topology(seconds=0.2, max_bytes=8 << 20)
    x = np.full(1 << 20, comm.peer_id, np.float32)
    info = comm.all_reduce(x)
    assert np.all(x == sum(info.peers))
    q.put(("auto", idx, (before, comm.link_connections)))
    comm.all_reduce(np.zeros(4, np.float32))
    comm.close()


@pytest.mark.timeout(120)
def test_auto_connections_follow_the_measured_window_limit() -> None:
    """Links of 64 KiB windows at 10 ms (6.5 MB/s per connection) capped at 26 MB/s
    per pair: about 4 connections carry it; 1 would be a quarter, 16 no faster."""
    import pyccl

    n = 3
    emu = linkemu.LinkEmulator(threads=2)
    with pyccl.Master(host="127.0.0.1", port=0) as master, PeerProcs() as procs:
        try:
            emu.default(linkemu.LinkParams(delay=0.01, rate=26e6, window=64 << 10))
            for i in range(n):
                ip = peer_ip(i)
                port = free_port(ip)
                adv = emu.open(port, f"p{i}", upstream_host=ip)
                procs.start(i, _auto_peer, master.address, ip, port, adv, n)
            got = procs.gather("auto", range(n), 100)
            for before, after in got.values():
                assert before == 4  # the starting pool
                assert 3 <= after <= 6, got
        finally:
            emu.close()


def _auto_opt_peer(idx: int, q, master: str, ip: str, port: int, adv: int, region: str, n: int) -> None:
    import pyccl

    comm = pyccl.Communicator(master, connections=2, data_port=port, data_host=ip, advertise=("127.0.0.1", adv),
                              region=region, auto_optimize=True, name=f"p{idx}")
    comm.connect(timeout=60)
    q.put(("hello", idx, (comm.peer_id, region)))
    deadline = time.monotonic() + 100
    stable = 0
    while time.monotonic() < deadline and stable < 5:
        comm.update_topology()  # with auto_optimize: an optimize_topology() after each change
        try:
            comm.all_reduce(np.zeros(16, np.float32))
        except pyccl.PeerFailure:
            continue
        stable = stable + 1 if comm.world_size == n else 0
    q.put(("ring", idx, comm.peers))
    for _ in range(3):  # nobody leaves while another still needs it
        comm.update_topology()
        comm.all_reduce(np.zeros(4, np.float32))
    comm.close()


@pytest.mark.timeout(150)
def test_auto_optimize_after_membership_changes() -> None:
    """Peers that only call update_topology() (auto_optimize=True), joining
    one by one in alternating regions, end on a ring that crosses twice."""
    import pyccl

    n = 6
    emu = linkemu.LinkEmulator(threads=2)
    with pyccl.Master(host="127.0.0.1", port=0) as master, PeerProcs() as procs:
        try:
            specs = []
            for i in range(n):
                ip = peer_ip(i)
                port = free_port(ip)
                specs.append((f"p{i}", GEO.region_of(i), ip, port, emu.open(port, f"p{i}", upstream_host=ip)))
            GEO.apply(emu, [(name, region, ip) for name, region, ip, _, _ in specs])
            region_of = {}
            for i, (_, region, ip, port, adv) in enumerate(specs):
                procs.start(i, _auto_opt_peer, master.address, ip, port, adv, region, n)
                pid, reg = procs.gather("hello", [i], 60)[i]
                region_of[pid] = reg
            rings = procs.gather("ring", range(n), 140)
            ring = rings[0]
            assert len(ring) == n and all(r == ring for r in rings.values()), rings
            assert crossings(ring, region_of) == 2, (ring, region_of)
        finally:
            emu.close()
