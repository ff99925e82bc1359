"""The real master on loopback, driven by raw sockets speaking the protocol."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from pyccl import protocol as P
from pyccl import wire
from pyccl.master import Master

REPO = Path(__file__).resolve().parents[1]


class RawPeer:
    """A hand-driven control connection."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self.peer_id = 0
        self.held: P.Epoch | None = None  # the last epoch, to expand an epoch_delta from
        self.deltas = 0

    def send(self, frame: dict[str, Any]) -> None:
        self.send_raw(wire.encode(frame))

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        frame = wire.recv_frame(self.sock)
        if frame["type"] == "epoch_delta":  # as a Communicator does: expanded from the epoch it holds
            frame = P.EpochDelta.parse(frame).expand(self.held).to_wire()
            self.deltas += 1
        if frame["type"] == "epoch":
            self.held = P.Epoch.parse(frame)
        return frame

    def expect(self, ftype: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        frame = self.recv(timeout)
        assert frame["type"] == ftype, frame
        for k, v in fields.items():
            assert frame[k] == v, (k, frame)
        return frame

    def hello(self, group: int = 0, name: str = "") -> dict[str, Any]:
        self.send({"type": "hello", "version": 1, "peer_group": group, "data_host": "127.0.0.1",
                   "data_port": 9000, "name": name})
        welcome = self.expect("welcome")
        self.peer_id = welcome["peer_id"]
        return welcome

    def until_closed(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Frames received until the master closes the connection (fails on timeout)."""
        frames = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                frames.append(self.recv(max(0.01, deadline - time.monotonic())))
            except (ConnectionError, wire.FrameError):
                return frames
            except TimeoutError:
                raise AssertionError(f"connection still open after {timeout} s; got {frames}") from None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def master() -> Iterator[Master]:
    m = Master(host="127.0.0.1", port=0, heartbeat_timeout=5.0)
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def caplog_master(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="pyccl.master")
    return caplog


def make_group(address: str, group: int = 0) -> tuple[RawPeer, RawPeer, int]:
    """Two members; returns them and the current epoch."""
    a, b = RawPeer(address), RawPeer(address)
    a.hello(group, "a")
    ep = a.expect("epoch", epoch=1, next_round=0)
    assert ep["members"] == [[a.peer_id, "127.0.0.1", 9000]]
    b.hello(group, "b")
    a.send({"type": "vote", "round": 0})  # b pending: ADMIT, a is the only member
    a.expect("drain", epoch=1, kind="admit")
    a.send({"type": "drained", "epoch": 1, "next_seq": []})
    ep_a = a.expect("epoch", epoch=2)
    assert a.expect("round_done", round=0)["changed"] is True
    ep_b = b.expect("epoch", epoch=2, next_round=0)  # b inherits the admitting round's position
    assert ep_a == ep_b
    assert [m[0] for m in ep_a["members"]] == [a.peer_id, b.peer_id]
    # b's loop starts with update_topology(): its first vote is round 0 itself,
    # already decided, answered at once with the recorded result
    b.send({"type": "vote", "round": 0})
    b.expect("round_done", round=0, changed=True)
    return a, b, 2


def check_op(peers: list[RawPeer], epoch: int, tag: int = 0, seq: int = 0) -> None:
    for p in peers:
        p.send({"type": "done", "epoch": epoch, "tag": tag, "seq": seq})
    for p in peers:
        p.expect("op_ok", epoch=epoch, tag=tag, seq=seq)


@pytest.mark.timeout(30)
def test_admission_round_and_op_ok_fan_out(master: Master):
    assert re.fullmatch(r"127\.0\.0\.1:\d+", master.address)
    assert master.port == int(master.address.rsplit(":", 1)[1]) > 0
    a, b, epoch = make_group(master.address)
    # a NO_CHANGE round is answered at once
    a.send({"type": "vote", "round": 1})
    a.expect("round_done", round=1, changed=False)
    b.send({"type": "vote", "round": 1})
    b.expect("round_done", round=1, changed=False)
    for seq in range(3):
        check_op([a, b], epoch, tag=7, seq=seq)
    # several frames in one write, and one frame dribbled byte by byte
    a.send_raw(b"".join(wire.encode({"type": "done", "epoch": epoch, "tag": 1, "seq": s}) for s in range(4)))
    for s in range(4):
        data = wire.encode({"type": "done", "epoch": epoch, "tag": 1, "seq": s})
        for i in range(len(data)):
            b.send_raw(data[i : i + 1])
    for s in range(4):
        a.expect("op_ok", seq=s, tag=1)
        b.expect("op_ok", seq=s, tag=1)


@pytest.mark.timeout(30)
def test_rounds_by_program_position_over_the_wire(master: Master):
    a, b, epoch = make_group(master.address)
    p = 3 << 20  # both begun 3 collectives: the votes jump from round 1 to 3 << 20
    c = RawPeer(master.address)
    c.hello(name="c")
    a.send({"type": "vote", "round": p})  # c pending: ADMIT, a waits for b
    b.send({"type": "vote", "round": p})
    for x in (a, b):
        x.expect("drain", epoch=epoch, kind="admit", reason=f"admitting peers [{c.peer_id}] at round {p}")
        x.send({"type": "drained", "epoch": epoch, "next_seq": []})
    ep = c.expect("epoch", epoch=epoch + 1, next_round=p)
    assert [m[0] for m in ep["members"]] == [a.peer_id, b.peer_id, c.peer_id]
    for x in (a, b):
        assert x.expect("epoch") == ep
        x.expect("round_done", round=p, changed=True)
    c.send({"type": "vote", "round": p})  # c's first update_topology(): round p, answered at once
    c.expect("round_done", round=p, changed=True)
    check_op([a, b, c], epoch + 1)
    p2 = 4 << 20
    for x in (a, b, c):
        x.send({"type": "vote", "round": p2})  # nobody pending: NO_CHANGE for everyone
        x.expect("round_done", round=p2, changed=False)
    # a vote below the last one + 1 is a protocol error that expels the sender
    c.send({"type": "vote", "round": p2})
    frames = c.until_closed()
    assert [f["type"] for f in frames] == ["error"]
    assert frames[0]["reason"] == f"'vote' for round {p2}, expected round {p2 + 1} or later"
    for x in (a, b):
        x.expect("drain", epoch=epoch + 1, kind="peer")


@pytest.mark.timeout(30)
def test_failed_op_drains_and_commits_with_fence(master: Master):
    a, b, epoch = make_group(master.address)
    a.send({"type": "failed", "epoch": epoch, "tag": 0, "seq": 0, "kind": "peer", "reason": "lost link"})
    for p in (a, b):
        p.expect("drain", epoch=epoch, kind="peer")
    a.send({"type": "drained", "epoch": epoch, "next_seq": [[0, 1]]})
    b.send({"type": "drained", "epoch": epoch, "next_seq": [[0, 2]]})
    ep = a.expect("epoch", epoch=epoch + 1, fence=[[0, 2]])
    assert b.expect("epoch") == ep


BAD_INPUTS = {
    "garbage": (b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", "undecodable msgpack"),
    "truncated": (b"\x00\x00\x00\x40" + msgpack.packb({"type": "hello"}), "truncated frame"),
    "oversized": (b"\xff\xff\xff\xff", "exceeds"),
    "empty": (b"\x00\x00\x00\x00", "empty frame"),
    "not-a-map": (wire._LEN.pack(4) + msgpack.packb([1, 2, 3]), "expected a map"),
    "no-type": (wire.encode({"kind": "hello"}), "no string 'type'"),
    "unknown-type": (wire.encode({"type": "teleport", "where": "mars"}), "unknown frame type 'teleport'"),
    "bad-hello": (wire.encode({"type": "hello", "version": 1, "peer_group": -5, "data_host": "h",
                               "data_port": 1}), "peer_group"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_closes_only_that_connection(master: Master, caplog_master, name: str):
    a, b, epoch = make_group(master.address)
    data, why = BAD_INPUTS[name]
    for hello_first in (False, True):
        bad = RawPeer(master.address)
        if hello_first:
            bad.hello(group=0)  # a pending peer of the same group
        bad.send_raw(data)
        if name == "truncated":
            bad.sock.shutdown(socket.SHUT_WR)  # the rest never comes
        frames = bad.until_closed()
        assert [f["type"] for f in frames] == ["error"], frames
        # a second hello is refused for being a second hello, whatever its fields
        assert (why if not (hello_first and name == "bad-hello") else "not allowed") in frames[0]["reason"]
        bad.close()
    text = caplog_master.text
    assert re.search(r"rejected frame from 127\.0\.0\.1:\d+.*" + re.escape(why), text), text
    # the legit group did not notice anything
    check_op([a, b], epoch)
    a.send({"type": "vote", "round": 1})
    a.expect("round_done", round=1, changed=False)
    # and the master still accepts new peers
    c = RawPeer(master.address)
    c.hello(group=3)
    c.expect("epoch", epoch=1)


@pytest.mark.timeout(30)
def test_invalid_frame_from_member_expels_it_and_drains_the_rest(master: Master, caplog_master):
    a, b, epoch = make_group(master.address)
    b.send({"type": "done", "epoch": epoch + 5, "tag": 0, "seq": 0})
    frames = b.until_closed()
    assert [f["type"] for f in frames] == ["error"] and "newer" in frames[0]["reason"]
    a.expect("drain", epoch=epoch, kind="peer")
    a.send({"type": "drained", "epoch": epoch, "next_seq": []})
    ep = a.expect("epoch", epoch=epoch + 1)
    assert [m[0] for m in ep["members"]] == [a.peer_id]
    assert "rejected frame from 127.0.0.1" in caplog_master.text


@pytest.mark.timeout(30)
def test_heartbeat_timeout_declares_silent_peer_dead(caplog_master):
    with Master(heartbeat_timeout=0.5) as m:
        t0 = time.monotonic()  # b's last frame (its hello) comes after this
        a, b, epoch = make_group(m.address)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(0.1):
                a.send({"type": "heartbeat"})

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        try:
            drain = a.expect("drain", timeout=3.0, epoch=epoch, kind="peer")
            elapsed = time.monotonic() - t0
            assert 0.45 <= elapsed < 3.0, elapsed
            assert "heartbeat timeout" in drain["reason"]
            frames = b.until_closed()
            assert [f["type"] for f in frames] == ["error"]
            a.send({"type": "drained", "epoch": epoch, "next_seq": []})
            ep = a.expect("epoch", epoch=epoch + 1)
            assert [x[0] for x in ep["members"]] == [a.peer_id]
            time.sleep(0.8)  # a keeps beating: still a member
            check_op([a], epoch + 1)
        finally:
            stop.set()
            beater.join()
    assert re.search(r"peer \d+ 'b' .* died: heartbeat timeout", caplog_master.text)


@pytest.mark.timeout(30)
def test_peer_disconnect_fails_over_quickly(master: Master):
    a, b, epoch = make_group(master.address)
    t0 = time.monotonic()
    b.close()
    a.expect("drain", epoch=epoch, kind="peer", timeout=2.0)
    assert time.monotonic() - t0 < 1.0


@pytest.mark.timeout(30)
def test_stop_closes_connections_and_joins():
    m = Master()
    m.start()
    a, b, _ = make_group(m.address)
    idle = RawPeer(m.address)  # never says hello
    thread = m._thread
    assert thread is not None and thread.is_alive()
    m.stop()
    assert not thread.is_alive()
    for p in (a, b, idle):
        assert p.until_closed(timeout=2.0) == []
    with pytest.raises(OSError):
        RawPeer(m.address)
    m.stop()  # idempotent
    with pytest.raises(RuntimeError):
        m.start()


@pytest.mark.timeout(30)
def test_context_manager_and_never_started_stop():
    with Master() as m:
        p = RawPeer(m.address)
        p.hello()
        p.expect("epoch")
    assert p.until_closed(timeout=2.0) == []
    Master().stop()  # never started: nothing to do
    with pytest.raises(RuntimeError):
        _ = Master().address


@pytest.mark.timeout(30)
def test_start_raises_when_port_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError):
            Master(port=s.getsockname()[1]).start()


@pytest.mark.timeout(60)
def test_cli_master_serves_and_stops_on_sigterm():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        # --recovery-hold 0: admit at once (the default holds a new group for the
        # heartbeat timeout, in case this is a restart whose members re-register).
        [sys.executable, "-m", "pyccl.cli", "master", "--port", "0", "--heartbeat-timeout", "2", "--recovery-hold", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        address = None
        lines = []
        deadline = time.monotonic() + 30
        while address is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
            if match:
                address = match.group(1)
        assert address, "".join(lines)
        p = RawPeer(address)
        p.hello(name="cli")
        p.expect("epoch", epoch=1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert p.until_closed(timeout=2.0) == []
        rest = proc.stderr.read()
        assert "admitted" in rest or any("admitted" in x for x in lines) or "stopping" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(30)
def test_cli_rejects_unknown_subcommand(capsys):
    from pyccl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["teleport"])
    assert exc.value.code == 2


@pytest.mark.timeout(60)
def test_fan_outs_larger_than_a_write_slice_keep_their_order(master: Master):
    """400 members: the drain, the epoch and round_done go out in slices
    (pyccl/master/writer.py), each connection still gets them in order, and
    an op_ok fan-out reaches every member."""
    from pyccl.master.writer import SLICE_WRITES

    n = 400
    assert n > SLICE_WRITES
    first = RawPeer(master.address)
    first.hello(0, "first")
    first.expect("epoch", epoch=1)
    peers = [RawPeer(master.address) for _ in range(n - 1)]
    try:
        for p in peers:
            p.hello(0)
        first.send({"type": "vote", "round": 0})
        first.expect("drain", epoch=1, kind="admit")
        first.send({"type": "drained", "epoch": 1, "next_seq": []})
        ring = first.expect("epoch", epoch=2)["members"]
        first.expect("round_done", round=0, changed=True)
        assert len(ring) == n
        for p in peers:
            assert p.expect("epoch", epoch=2)["members"] == ring
        everyone = [first, *peers]
        check_op(everyone, 2, tag=0, seq=0)
        peers[-1].send({"type": "failed", "epoch": 2, "tag": 0, "seq": 1, "kind": "mismatch", "reason": "x"})
        for p in everyone:
            p.expect("drain", epoch=2, kind="mismatch")
            p.send({"type": "drained", "epoch": 2, "next_seq": [[0, 2]]})
        for p in everyone:
            assert p.expect("epoch", epoch=3)["fence"] == [[0, 2]]
        check_op(everyone, 3, tag=0, seq=0)
    finally:
        first.close()
        for p in peers:
            p.close()
