"""``pyccl stress`` (issue 4): its parts, and whole runs through the command line.

* unit: value parsers, the deterministic workload, the fault schedule, the
  verifier, the stuck watchdog, the fault-injecting proxy (delay, window
  throughput bound, bandwidth cap, stall, reset, EOF) and its host process;
* whole runs (``python -m pyccl.cli stress`` in a subprocess of its own
  session, so every child can be accounted for): 60 s with 4 peers and every
  fault kind must end with zero violations; a run whose peer corrupts one
  result (the hidden debug switch) must report it and exit non-zero.

Every test has a timeout, uses loopback only, and checks that it left no
process and no listening port behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyccl.stress import config as cfgmod
from pyccl.stress.faults import FaultKind, FaultScheduler
from pyccl.stress.protocol import OpOutcome, StepReport, SyncReport, parse_peer_frame
from pyccl.stress.proxy import FaultProxy, LinkShape
from pyccl.stress.verify import Verifier
from pyccl.stress.watchdog import StuckWatchdog
from pyccl.stress.workload import Workload, state_arrays, update_state

from conftest import pyccl_pythonpath

REPO = Path(__file__).resolve().parents[1]

# Every test has a timeout; the whole runs below set their own, longer ones.
pytestmark = pytest.mark.timeout(120)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def run_loop(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


# ====================================================================== parsers


def test_parsers() -> None:
    assert cfgmod.parse_size("16MiB") == 16 << 20
    assert cfgmod.parse_size("256KiB") == 256 << 10
    assert cfgmod.parse_size("1GB") == 10**9
    assert cfgmod.parse_size("4096") == 4096
    assert cfgmod.parse_duration("50ms") == pytest.approx(0.05)
    assert cfgmod.parse_duration("2m") == 120
    assert cfgmod.parse_duration("60s") == 60
    assert cfgmod.parse_rate("0.2/s") == pytest.approx(0.2)
    assert cfgmod.parse_rate("12/min") == pytest.approx(0.2)
    assert cfgmod.parse_bandwidth("100MiB/s") == 100 * 2**20
    assert cfgmod.parse_bandwidth("800Mbit/s") == pytest.approx(1e8)
    r = cfgmod.parse_duration_range("1s..5s")
    assert (r.low, r.high, r.draw(0.5)) == (1, 5, 3)
    assert cfgmod.parse_duration_range("forever").draw(0.3) is None
    for bad, parser in [("12 parsecs", cfgmod.parse_size), ("fast", cfgmod.parse_rate),
                        ("5s..1s", cfgmod.parse_duration_range), ("1.5B", cfgmod.parse_size)]:
        with pytest.raises(ValueError):
            parser(bad)


@pytest.mark.timeout(60)
def test_cli_rejects_bad_arguments() -> None:
    for args in (["--peers", "1"], ["--size", "3", "--dtype", "float32"], ["--kill-rate", "often"]):
        r = subprocess.run([sys.executable, "-m", "pyccl.cli", "stress", *args], capture_output=True, text=True,
                           timeout=50, env=_env(), cwd=tempfile.gettempdir())
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "error" in r.stderr


# ====================================================================== workload


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int8", "uint8", "int32"])
@pytest.mark.parametrize("op", ["sum", "max", "min"])
def test_workload_expected_is_the_exact_reduction(dtype: str, op: str) -> None:
    w = Workload(seed=5, dtype=dtype, count=4099, op=op, max_world=16)
    pattern = w.pattern(revision=7, tag=2)
    peers = [3, 11, 4, 8, 15]
    inputs = [w.input_for(pattern, 7, 2, p) for p in peers]
    if op == "sum":
        wide = np.zeros(w.count, np.float64 if w.dtype.kind == "f" else np.int64)
        for x in inputs:
            wide += x
        ref = wide.astype(w.dtype)
    else:
        ref = inputs[0].copy()
        for x in inputs[1:]:
            ref = (np.maximum if op == "max" else np.minimum)(ref, x)
    exp = w.expected(pattern, 7, 2, peers)
    assert Workload.compare(exp, ref) is None
    # Every peer's input differs, and so does the next revision's pattern.
    assert len({x.tobytes() for x in inputs}) == len(peers)
    assert not np.array_equal(w.pattern(8, 2), pattern)
    # A single wrong element is found and located.
    bad = exp.copy()
    bad[1234] = bad[1234] + bad.dtype.type(1)
    mm = Workload.compare(bad, exp)
    assert mm is not None and mm.index == 1234 and mm.bad_elements == 1


def test_state_update_is_deterministic() -> None:
    a, b = state_arrays(4096), state_arrays(4096)
    r = [np.arange(100, dtype=np.float32), np.arange(100, dtype=np.float32) * 2]
    for s in (a, b):
        update_state(s["params"], s["meta"], 3, [1, 2], r)
    assert a["params"].tobytes() == b["params"].tobytes() and list(a["meta"]) == [4, 2, 3, 1]
    update_state(b["params"], b["meta"], 3, [1, 5], r)
    assert a["params"].tobytes() != b["params"].tobytes()


# ====================================================================== faults


def test_fault_schedule_is_seeded_poisson() -> None:
    def arrivals(seed: int) -> list[tuple[float, str]]:
        s = FaultScheduler({FaultKind.KILL: 0.5, FaultKind.JOIN: 0.2, FaultKind.HANG: 0.0}, seed)
        s.start(0.0)
        out = []
        t = 0.0
        while t < 2000:
            t += 0.05
            out += [(round(t, 2), k.value) for k in s.due(t)]
        return out

    a = arrivals(1)
    assert a == arrivals(1) and a != arrivals(2)
    kills = sum(1 for _, k in a if k == "kill")
    joins = sum(1 for _, k in a if k == "join")
    assert 850 < kills < 1150 and 320 < joins < 480
    assert not any(k == "hang" for _, k in a)


# ====================================================================== verifier


def _step(peer: int, rev: int, ops: list[OpOutcome], findings: tuple[dict[str, Any], ...] = ()) -> StepReport:
    return StepReport(peer, rev, 0.0, 0.0, tuple(ops), findings)


def test_verifier_accepts_agreeing_peers_and_counts_ops_once() -> None:
    v = Verifier()
    for p in (1, 2, 3):
        viol, _ = v.on_step(_step(p, 5, [OpOutcome(0, "ok", 2, (1, 2, 3), 0xAB), OpOutcome(1, "ok", 2, (1, 2, 3), 7)]), 1.0)
        assert viol == []
    assert v.ops_completed == 2 and v.results_checked == 6 and v.pending == 0


def test_verifier_catches_a_hash_mismatch_and_findings() -> None:
    v = Verifier()
    v.on_step(_step(1, 5, [OpOutcome(0, "ok", 2, (1, 2), 0xAB)]), 1.0)
    viol, _ = v.on_step(_step(2, 5, [OpOutcome(0, "ok", 2, (1, 2), 0xAC)],
                              ({"kind": "wrong_result", "tag": 0, "rev": 5, "epoch": 2, "index": 9, "got": 1.0,
                                "expected": 2.0},)), 1.5)
    kinds = sorted(x.kind for x in viol)
    assert kinds == ["hash_mismatch", "wrong_result"]
    line = next(x for x in viol if x.kind == "wrong_result").line()
    assert "step(rev)=5" in line and "index=9" in line and "got=1.0" in line and "expected=2.0" in line
    # A late report of a finished op is still compared.
    viol, _ = v.on_step(_step(3, 5, [OpOutcome(0, "ok", 2, (1, 2), 0xAD)]), 2.0)
    assert [x.kind for x in viol] == ["participants_disagree", "hash_mismatch"]


def test_verifier_catches_a_split_outcome() -> None:
    v = Verifier()
    v.on_step(_step(1, 5, [OpOutcome(0, "ok", 2, (1, 2, 3), 1)]), 1.0)
    v.on_step(_step(2, 5, [OpOutcome(0, "ok", 2, (1, 2, 3), 1)]), 1.0)
    # Peer 3 failed that op and went on to epoch 3: one outcome per op is broken.
    viol, _ = v.on_step(_step(3, 5, [OpOutcome(0, "peer_failure", e0=2, e1=2)]), 1.1)
    assert viol == []  # nothing proves yet that it will not report it later
    viol, _ = v.on_step(_step(3, 5, [OpOutcome(0, "ok", 3, (1, 3), 9)]), 1.2)
    assert [x.kind for x in viol] == ["split_outcome"] and viol[0].epoch == 2


def test_verifier_exempts_killed_peers_and_handles_retries_in_one_epoch() -> None:
    v = Verifier()
    v.on_step(_step(1, 5, [OpOutcome(0, "ok", 2, (1, 2, 3), 1)]), 1.0)
    v.exempt(3)  # killed before it reported
    viol, _ = v.on_step(_step(2, 5, [OpOutcome(0, "ok", 2, (1, 2, 3), 1)]), 1.0)
    assert viol == [] and v.pending == 0
    # The step is retried in the same epoch (another tag failed): a second
    # occurrence of (epoch 2, tag 0, revision 5), matched in order.
    for p in (1, 2):
        viol, _ = v.on_step(_step(p, 5, [OpOutcome(0, "ok", 2, (1, 2, 3), 1)]), 2.0)
        assert viol == []
    assert v.ops_completed == 2


def test_verifier_checks_shared_state_by_revision() -> None:
    v = Verifier()
    assert v.on_sync(SyncReport(1, 10, 0xAAA, 3, (1, 2), 0, 0.0, 1.0), 1.0) == []
    assert v.on_sync(SyncReport(2, 10, 0xAAA, 3, (1, 2), 0, 0.0, 1.0), 1.0) == []
    viol = v.on_sync(SyncReport(2, 10, 0xBBB, 3, (1, 2), 0, 0.0, 1.0), 1.0)
    assert [x.kind for x in viol] == ["state_divergence"]
    viol = v.on_sync(SyncReport(1, 9, 0xCCC, 3, (1, 2), 0, 0.0, 1.0), 1.0)
    assert [x.kind for x in viol] == ["revision_regressed"]


def test_telemetry_frames_are_validated() -> None:
    rep = _step(4, 2, [OpOutcome(1, "ok", 3, (4, 5), (1 << 64) - 1, 0.5, 3, 3)])
    back = parse_peer_frame(rep.to_frame())
    assert back == rep
    frame = rep.to_frame()
    frame["ops"][0][1] = "fine"
    from pyccl.wire import FrameError

    with pytest.raises(FrameError):
        parse_peer_frame(frame)


# ====================================================================== watchdog


def test_watchdog_reports_a_stuck_phase_once_counting_from_the_last_fault() -> None:
    w = StuckWatchdog(threshold=7.0)
    w.on_phase(0, "ops", 10.0, 5, 2, 1, (1, 2))
    w.on_phase(1, "idle", 10.0, 5, 2, 2, (1, 2))
    assert w.check(16.0) == []
    w.on_fault(15.0)
    assert w.check(21.0) == []  # 11 s in the op, but only 6 since the fault
    viol = w.check(22.5)
    assert [x.kind for x in viol] == ["stuck"] and viol[0].values["phase"] == "ops"
    assert w.check(30.0) == []  # reported once
    w.on_phase(0, "update", 31.0, 5, 2, 1, (1, 2))
    assert w.episodes[0].length == pytest.approx(21.0)


def test_watchdog_phase_limits() -> None:
    w = StuckWatchdog(threshold=7.0, limits={"sync": 15.0})
    w.on_phase(0, "sync", 0.0, 1, 1, 1, (1,))
    w.on_phase(1, "topology", 0.0, 1, 1, 2, (2,))
    viol = w.check(10.0)
    assert [v.values["phase"] for v in viol] == ["topology"]
    assert [v.values["phase"] for v in w.check(16.0)] == ["sync"]


def test_watchdog_does_not_time_a_stopped_peer() -> None:
    w = StuckWatchdog(threshold=5.0)
    w.on_phase(0, "sync", 0.0, 1, 1, 1, (1,))
    w.on_stopped(0)
    assert w.check(100.0) == []
    w.on_continued(0, 100.0)
    assert w.check(104.0) == []
    assert len(w.check(106.0)) == 1


# ====================================================================== proxy


async def _server() -> tuple[asyncio.AbstractServer, int, asyncio.Queue[Any]]:
    """A server that hands each accepted (reader, writer) to the returned queue."""
    conns: asyncio.Queue[Any] = asyncio.Queue()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await conns.put((r, w))

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], conns


async def _through(shape: LinkShape) -> tuple[FaultProxy, asyncio.AbstractServer, Any, Any, asyncio.Queue[Any], int]:
    srv, port, conns = await _server()
    proxy = FaultProxy(("127.0.0.1", port), shape)
    pport = await proxy.start()
    cr, cw = await asyncio.open_connection("127.0.0.1", pport)
    sr, sw = await asyncio.wait_for(conns.get(), 5)
    return proxy, srv, (cr, cw), (sr, sw), conns, pport


async def _cleanup(proxy: FaultProxy, srv: asyncio.AbstractServer, *writers: Any) -> list[int]:
    for w in writers:
        w.close()
    await proxy.close()
    srv.close()
    await srv.wait_closed()
    return [proxy.port, srv.sockets[0].getsockname()[1] if srv.sockets else 0]


async def _drain(reader: asyncio.StreamReader, n: int) -> float:
    got = 0
    while got < n:
        chunk = await reader.read(1 << 20)
        assert chunk, "EOF before all bytes arrived"
        got += len(chunk)
    return time.monotonic()


@pytest.mark.timeout(60)
def test_proxy_delay_is_one_way_in_each_direction() -> None:
    async def main() -> None:
        proxy, srv, (cr, cw), (sr, sw), _, pport = await _through(LinkShape(delay=0.05))
        rtts = []
        for _ in range(5):
            t0 = time.monotonic()
            cw.write(b"ping")
            assert await sr.readexactly(4) == b"ping"
            sw.write(b"pong")
            assert await cr.readexactly(4) == b"pong"
            rtts.append(time.monotonic() - t0)
        assert min(rtts) >= 0.099, rtts
        assert min(rtts) < 0.25, rtts
        await _cleanup(proxy, srv, cw, sw)
        assert port_is_free(pport)

    run_loop(main())


@pytest.mark.timeout(60)
def test_proxy_window_bounds_throughput_per_connection() -> None:
    """delay 50 ms, window 256 KiB: each connection carries <= 5.2 MB/s; four carry four times that."""
    delay, window, n = 0.05, 256 << 10, 2 << 20
    bound = window / delay

    async def one(conns: int) -> float:
        srv, port, q = await _server()
        proxy = FaultProxy(("127.0.0.1", port), LinkShape(delay=delay, window=window))
        pport = await proxy.start()
        clients = [await asyncio.open_connection("127.0.0.1", pport) for _ in range(conns)]
        servers = [await asyncio.wait_for(q.get(), 5) for _ in range(conns)]
        t0 = time.monotonic()
        for _, w in clients:
            w.write(b"x" * n)
        ends = await asyncio.gather(*(_drain(r, n) for r, _ in servers))
        elapsed = max(ends) - t0
        await _cleanup(proxy, srv, *(w for _, w in clients), *(w for _, w in servers))
        assert port_is_free(pport)
        return conns * n / elapsed

    async def main() -> None:
        single = await one(1)
        assert single <= bound * 1.02, (single, bound)
        assert single >= bound * 0.4, (single, bound)  # loose: shared CI machines
        four = await one(4)
        assert four <= 4 * bound * 1.02
        assert four >= 2.5 * single, (four, single)

    run_loop(main())


@pytest.mark.timeout(60)
def test_proxy_bandwidth_cap() -> None:
    rate, n = 4e6, 2 << 20

    async def main() -> None:
        proxy, srv, (cr, cw), (sr, sw), _, _ = await _through(LinkShape(bandwidth=rate))
        t0 = time.monotonic()
        cw.write(b"y" * n)
        elapsed = await _drain(sr, n) - t0
        assert elapsed >= (n - (64 << 10)) / rate * 0.95, elapsed
        assert elapsed < n / rate * 3, elapsed
        await _cleanup(proxy, srv, cw, sw)

    run_loop(main())


@pytest.mark.timeout(60)
def test_proxy_stall_is_silent_and_ends() -> None:
    async def main() -> None:
        proxy, srv, (cr, cw), (sr, sw), _, _ = await _through(LinkShape())
        cw.write(b"a")
        assert await asyncio.wait_for(sr.readexactly(1), 5) == b"a"
        assert proxy.stall(0.6) == 1
        t0 = time.monotonic()
        cw.write(b"b")
        sw.write(b"c")
        cw.write_eof()  # a FIN during the stall is held back too
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sr.read(1), 0.4)
        assert await asyncio.wait_for(sr.readexactly(1), 5) == b"b"
        assert time.monotonic() - t0 >= 0.55
        assert await asyncio.wait_for(sr.read(1), 5) == b""  # then the EOF
        assert await asyncio.wait_for(cr.readexactly(1), 5) == b"c"
        # A new connection is not stalled.
        cr2, cw2 = await asyncio.open_connection("127.0.0.1", proxy.port)
        await _cleanup(proxy, srv, cw, sw, cw2)

    run_loop(main())


@pytest.mark.timeout(60)
def test_proxy_stall_forever_is_a_black_hole() -> None:
    async def main() -> None:
        proxy, srv, (cr, cw), (sr, sw), _, _ = await _through(LinkShape(delay=0.01))
        assert proxy.stall(None) == 1
        cw.write(b"z" * 1000)
        cw.close()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sr.read(1), 1.0)  # neither bytes nor EOF
        await proxy.close()  # closing the proxy finally tears it down (RST)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            data = await asyncio.wait_for(sr.read(1), 5)
            if data == b"":
                raise asyncio.IncompleteReadError(b"", 1)
        await _cleanup(proxy, srv, sw)

    run_loop(main())


@pytest.mark.timeout(60)
def test_proxy_reset_sends_rst_to_both_ends() -> None:
    async def main() -> None:
        proxy, srv, (cr, cw), (sr, sw), _, _ = await _through(LinkShape(delay=0.01))
        cw.write(b"hello")
        assert await asyncio.wait_for(sr.readexactly(5), 5) == b"hello"
        assert proxy.reset(all_connections=True) == 1
        for r in (cr, sr):
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(10), 5)
        assert proxy.stats.resets == 1
        await _cleanup(proxy, srv, cw, sw)

    run_loop(main())


@pytest.mark.timeout(60)
def test_proxy_refuses_when_nobody_is_behind_it() -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        proxy = FaultProxy(("127.0.0.1", dead), LinkShape())
        pport = await proxy.start()
        r, w = await asyncio.open_connection("127.0.0.1", pport)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            data = await asyncio.wait_for(r.read(1), 5)
            if data == b"":
                raise asyncio.IncompleteReadError(b"", 1)
        w.close()
        await proxy.close()
        assert port_is_free(pport)

    run_loop(main())


@pytest.mark.timeout(90)
def test_netem_process_hosts_proxies() -> None:
    from pyccl.stress.netem import NetemClient

    async def main() -> None:
        srv, port, q = await _server()
        netem = NetemClient(LinkShape(delay=0.005))
        await netem.start()
        try:
            pport = await netem.open(port, "t")
            r, w = await asyncio.open_connection("127.0.0.1", pport)
            sr, sw = await asyncio.wait_for(q.get(), 5)
            w.write(b"abc")
            assert await asyncio.wait_for(sr.readexactly(3), 5) == b"abc"
            assert await netem.stall(pport, 0.2) == 1
            assert (await netem.stats())[pport][0] == 3
            assert await netem.reset(pport) == 1
            with pytest.raises(RuntimeError):
                await netem.stall(1, 1.0)
            await netem.close_proxy(pport)
            assert port_is_free(pport)
            w.close()
            sw.close()
        finally:
            await netem.close()
            srv.close()
            await srv.wait_closed()

    run_loop(main())


# ====================================================================== whole runs


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = pyccl_pythonpath()
    env.pop("PYCCL_STRESS_CORRUPT", None)
    return env


def _stress(args: list[str], timeout: float, tmp: Path, env: dict[str, str] | None = None) -> tuple[int, str, dict[str, Any]]:
    """Run ``pyccl stress`` in its own session; returns (exit code, output, JSON report).

    Fails if any process of the session survives the run or any port it
    listened on is still open."""
    report = tmp / "report.json"
    cmd = [sys.executable, "-m", "pyccl.cli", "stress", "--quiet", "--report", str(report),
           "--workdir", str(tmp / "logs"), *args]
    # cwd outside the repository: `python -m` puts the cwd first on sys.path,
    # and the source tree must not shadow an installed pyccl (CI).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or _env(), start_new_session=True, cwd=str(tmp))
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"pyccl stress did not finish in {timeout} s:\n{out[-5000:]}") from None
    finally:
        # Children die with the orchestrator (PR_SET_PDEATHSIG) and helpers such
        # as multiprocessing's resource tracker exit on its EOF: allow a moment.
        deadline = time.monotonic() + 10
        while (leftovers := _session_alive(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        described = [_cmdline(p) for p in leftovers]
        if leftovers:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not leftovers, f"processes left behind by the run: {described}"
    rep = json.loads(report.read_text()) if report.exists() else {}
    for port in [rep.get("ports", {}).get("master"), rep.get("ports", {}).get("telemetry")] + [
        p for row in rep.get("ports", {}).get("peers", []) for p in row[1:]
    ]:
        if port:
            assert port_is_free(port), f"port {port} still listens after the run"
    return proc.returncode, out, rep


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return f"{pid}: ?"


def _session_alive(sid: int) -> list[int]:
    """Pids of processes still in session ``sid`` (Linux /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":  # session id is the 6th field overall
                out.append(int(d))
        except (OSError, IndexError, ValueError):
            continue
    return out


@pytest.mark.timeout(300)
def test_stress_60s_all_faults_zero_violations(tmp_path: Path) -> None:
    args = [
        "--peers", "4", "--duration", "60s", "--size", "256KiB", "--concurrency", "4", "--connections", "2",
        "--kill-rate", "0.2/s", "--hang-rate", "0.1/s", "--join-rate", "0.2/s",
        "--net-delay", "2ms", "--net-stall-rate", "0.1/s", "--net-reset-rate", "0.2/s",
        "--heartbeat-timeout", "2s", "--pace", "10ms", "--seed", "4", "--intruder-rate", "0.3/s",
    ]
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        args += ["--plot", str(tmp_path / "run.png")]
    code, out, rep = _stress(args, 280, tmp_path)
    assert code == 0, out[-6000:]
    assert rep["ok"] and rep["violations"] == [], out[-6000:]
    assert "RESULT: OK (0 violations)" in out
    kinds = rep["faults_by_kind"]
    for kind in ("kill", "hang", "join", "net_stall", "net_reset"):
        assert kinds[kind]["injected"] >= 1, (kind, kinds)
        assert kinds[kind]["survived"] == kinds[kind]["injected"] or kind == "join", (kind, kinds)
    intr = rep["intruders"]
    assert len(intr["attempts"]) >= 5 and intr["leaks"] == 0, intr
    assert all(a["rejected"] for a in intr["attempts"]), intr
    assert sum(1 for d in intr["by_attack"].values() if d["attempts"]) >= 3, intr["by_attack"]
    t = rep["totals"]
    assert t["ops_completed"] > 200 and t["syncs_checked"] > 50 and t["op_failures_retried"] > 0
    assert rep["timeline"]["rows"], "no timeline"
    if "--plot" in args:
        assert (tmp_path / "run.png").stat().st_size > 10_000


@pytest.mark.timeout(300)
def test_stress_geography_with_optimize_and_all_faults_zero_violations(tmp_path: Path) -> None:
    """Two regions behind the compiled emulator, optimize_topology() every 4th
    revision, 2 MiB all-reduces (two-level whenever the regions are of equal
    size), every fault kind: no violation."""
    geo = Path(__file__).resolve().parent.parent / "examples" / "geo_2regions.json"
    args = [
        "--peers", "4", "--duration", "40s", "--size", "2MiB", "--concurrency", "2", "--connections", "2",
        "--kill-rate", "0.1/s", "--hang-rate", "0.05/s", "--join-rate", "0.1/s",
        "--net-stall-rate", "0.2/s", "--net-reset-rate", "0.3/s", "--geography", str(geo),
        "--optimize-every", "4", "--heartbeat-timeout", "2s", "--seed", "5",
    ]
    code, out, rep = _stress(args, 280, tmp_path)
    assert code == 0, out[-6000:]
    assert rep["ok"] and rep["violations"] == [], out[-6000:]
    kinds = rep["faults_by_kind"]
    for kind in ("kill", "hang", "join", "net_stall", "net_reset"):
        assert kinds[kind]["injected"] >= 1, (kind, kinds)
    assert "geography" in out


@pytest.mark.timeout(180)
def test_stress_catches_a_corrupted_result(tmp_path: Path) -> None:
    env = _env()
    env["PYCCL_STRESS_CORRUPT"] = "1"  # the hidden switch (also --debug-corrupt-peer 1)
    code, out, rep = _stress(["--peers", "3", "--duration", "5s", "--size", "64KiB", "--kill-rate", "0",
                              "--hang-rate", "0", "--join-rate", "0"], 150, tmp_path, env)
    assert code == 1, out[-4000:]
    kinds = {v["kind"] for v in rep["violations"]}
    assert {"wrong_result", "hash_mismatch"} <= kinds, rep["violations"]
    wrong = next(v for v in rep["violations"] if v["kind"] == "wrong_result")
    assert wrong["rev"] is not None and len(wrong["peers"]) >= 2  # (may happen before the third peer is in)
    assert wrong["values"]["got"] == wrong["values"]["expected"] + 1
    assert "VIOLATION [wrong_result]" in out and "RESULT: FAILED" in out


@pytest.mark.timeout(240)
def test_stress_with_master_kills_zero_violations(tmp_path: Path) -> None:
    """--master-kill-rate: the master is SIGKILLed and restarted while peers die and join; every check holds."""
    args = [
        "--peers", "3", "--duration", "40s", "--size", "256KiB", "--concurrency", "2", "--connections", "2",
        "--kill-rate", "0.05/s", "--hang-rate", "0", "--join-rate", "0.1/s", "--master-kill-rate", "0.15/s",
        "--heartbeat-timeout", "2s", "--pace", "10ms", "--seed", "12",
    ]
    code, out, rep = _stress(args, 220, tmp_path)
    assert code == 0, out[-6000:]
    assert rep["ok"] and rep["violations"] == [], out[-6000:]
    kinds = rep["faults_by_kind"]
    assert kinds["master_kill"]["injected"] >= 2, kinds
    assert kinds["master_kill"]["survived"] == kinds["master_kill"]["injected"], kinds
