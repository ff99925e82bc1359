"""The run secret (pyccl/auth.py): the master's challenge-response as a pure
state machine, then real masters and peers on loopback: the right secret
joins, a wrong or missing one gets AuthenticationError within a second, the
running group never notices, and a secret given to an open master is an
error too (a peer with a secret expects an authenticated run)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import pyccl
import pytest
from pyccl import auth
from pyccl.master.state import Close, MasterState, PeerPhase, Send

from group_helpers import all_reduce, group

pytestmark = pytest.mark.timeout(60)

SECRET = b"correct horse battery staple"


def _hello(nonce: bytes | None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "hello", "version": 1, "peer_group": 0, "data_host": "10.0.0.1",
                             "data_port": 7000}
    if nonce is not None:
        frame["nonce"] = nonce
    return frame


def _frames(actions: list[Any]) -> list[dict[str, Any]]:
    return [a.frame.to_wire() for a in actions if isinstance(a, Send)]


class _Nonces:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> bytes:
        self.n += 1
        return self.n.to_bytes(32, "big")


def test_challenge_then_welcome_with_the_right_proof() -> None:
    st = MasterState(5.0, secret=SECRET, nonce=_Nonces())
    st.on_connect(1, 0.0, "10.0.0.1:5000")
    np_ = b"p" * 32
    (challenge,) = _frames(st.on_frame(1, _hello(np_), 0.0))
    assert challenge["type"] == "challenge" and st.peer_phase(1) is PeerPhase.CHALLENGED
    assert challenge["proof"] == auth.master_proof(SECRET, np_, challenge["nonce"])
    out = _frames(st.on_frame(1, {"type": "auth", "proof": auth.peer_proof(SECRET, np_, challenge["nonce"])}, 0.1))
    assert [f["type"] for f in out] == ["welcome", "epoch"]  # first peer: admitted at once
    assert st.peer_phase(1) is PeerPhase.MEMBER


@pytest.mark.parametrize("case", ["wrong proof", "no nonce", "replayed proof", "vote before auth"])
def test_failed_proofs_close_only_that_connection(case: str) -> None:
    st = MasterState(5.0, secret=SECRET, nonce=_Nonces())
    st.on_connect(1, 0.0, "10.0.0.1:5000")
    np_ = b"p" * 32
    (challenge,) = _frames(st.on_frame(1, _hello(np_), 0.0))
    st.on_frame(1, {"type": "auth", "proof": auth.peer_proof(SECRET, np_, challenge["nonce"])}, 0.0)
    recorded = auth.peer_proof(SECRET, np_, challenge["nonce"])
    st.on_connect(2, 0.0, "10.0.0.9:6000")
    if case == "no nonce":
        actions = st.on_frame(2, _hello(None), 0.0)
    else:
        st.on_frame(2, _hello(np_), 0.0)  # a fresh challenge nonce, so a recorded proof is stale
        frame = {"type": "vote", "round": 0} if case == "vote before auth" else \
            {"type": "auth", "proof": recorded if case == "replayed proof" else b"x" * 32}
        actions = st.on_frame(2, frame, 0.0)
    errors = _frames(actions)
    assert len(errors) == 1 and errors[0]["type"] == "error"
    assert errors[0]["kind"] == ("protocol" if case == "vote before auth" else "auth"), errors
    assert isinstance(actions[-1], Close) and st.peer_phase(2) is PeerPhase.GONE
    info = st.group_info(0)
    assert info is not None and info.members == (1,) and info.epoch == 1  # the group never noticed


def test_refusals_are_logged_once_per_source(caplog: pytest.LogCaptureFixture) -> None:
    st = MasterState(5.0, secret=SECRET, nonce=_Nonces())
    with caplog.at_level(logging.WARNING, logger="pyccl.master"):
        for c in range(1, 6):
            st.on_connect(c, 0.0, f"10.0.0.9:{6000 + c}")
            st.on_frame(c, _hello(None), 0.0)
    assert sum("refused connection" in r.message for r in caplog.records) == 1


def test_no_auth_in_time_expires() -> None:
    st = MasterState(2.0, secret=SECRET, nonce=_Nonces())
    st.on_connect(1, 0.0, "10.0.0.1:5000")
    st.on_frame(1, _hello(b"p" * 32), 0.0)
    out = st.on_tick(2.5)
    assert any(isinstance(a, Close) and "auth" in a.reason for a in out)


# ------------------------------------------------------------ on loopback


def _member_loop(comm: pyccl.Communicator, stop: threading.Event, epochs: list[int]) -> None:
    x = np.ones(4, np.float32)
    while not stop.is_set():
        comm.update_topology()
        comm.all_reduce(x)
        x[:] = 1
        epochs.append(comm.epoch)
        time.sleep(0.01)


@pytest.mark.parametrize("master_secret, peer_secret, expect", [
    (SECRET, b"wrong secret", "could not prove it holds this peer's run secret"),
    (SECRET, None, "requires the run secret: set PYCCL_SECRET"),
    (None, SECRET, "runs without a secret, but this peer was given one"),
])
def test_mismatched_secrets_fail_fast_and_the_group_goes_on(master_secret: bytes | None, peer_secret: bytes | None,
                                                            expect: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYCCL_SECRET", raising=False)
    stop = threading.Event()
    with pyccl.Master(host="127.0.0.1", port=0, secret=master_secret) as master:
        a = pyccl.Communicator(master.address, connections=1, secret=master_secret).connect(timeout=10)
        epochs: list[int] = []
        t = threading.Thread(target=_member_loop, args=(a, stop, epochs), daemon=True)
        t.start()
        try:
            time.sleep(0.2)
            t0 = time.monotonic()
            with pytest.raises(pyccl.AuthenticationError, match=expect) as info:
                pyccl.Communicator(master.address, connections=1, secret=peer_secret).connect(timeout=10)
            assert time.monotonic() - t0 < 5.0  # fails fast (the time itself is measured in benchmarks/auth.py)
            assert master.address in str(info.value) and info.value.master == master.address
            n = len(epochs)
            time.sleep(0.3)
            assert len(epochs) > n, "the group stalled"
            assert set(epochs) == {a.epoch} and a.world_size == 1
        finally:
            stop.set()
            t.join(10)
            a.close()


def test_the_right_secret_joins_and_the_environment_supplies_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYCCL_SECRET", SECRET.decode())
    with pyccl.Master(host="127.0.0.1", port=0) as master:  # secret from the environment
        a = pyccl.Communicator(master.address, connections=1).connect(timeout=10)
        b = pyccl.Communicator(master.address, connections=1, secret=SECRET)
        t = threading.Thread(target=b.connect, kwargs={"timeout": 10})
        t.start()
        deadline = time.monotonic() + 10
        while a.world_size < 2 and time.monotonic() < deadline:
            a.update_topology()
            time.sleep(0.01)
        t.join(10)
        x, y = np.ones(8, np.float32), np.full(8, 2, np.float32)
        ta = threading.Thread(target=a.all_reduce, args=(x,))
        ta.start()
        b.all_reduce(y)
        ta.join(10)
        assert (x == 3).all() and (y == 3).all()
        a.close()
        b.close()


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """A self-signed certificate for 127.0.0.1 (its own CA), and an unrelated one."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    for name in ("master", "other"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / f"{name}.key"),
                        "-out", str(d / f"{name}.pem")], check=True, capture_output=True, timeout=60)
    return str(d / "master.pem"), str(d / "master.key"), str(d / "other.pem")


def test_tls_group_decides_ops_through_the_python_reader(tls_files: tuple[str, str, str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Over TLS the core cannot read the master connection: verdicts take the
    Python reader and the condition variable, and still commit every op."""
    monkeypatch.delenv("PYCCL_SECRET", raising=False)
    cert, key, _ = tls_files
    with pyccl.Master(host="127.0.0.1", port=0, tls_cert=cert, tls_key=key) as master:
        comms = group(master.address, 2, None, tls_ca=cert)
        try:
            assert all(c._control.channel is None for c in comms)
            for _ in range(20):
                xs = all_reduce(comms, 64)
                assert all((x == 3.0).all() for x in xs)
        finally:
            for c in comms:
                c.close()


@pytest.mark.parametrize("with_secret", [False, True])
def test_tls_control_connection(tls_files: tuple[str, str, str], with_secret: bool,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYCCL_SECRET", raising=False)
    cert, key, other = tls_files
    secret = SECRET if with_secret else None
    with pyccl.Master(host="127.0.0.1", port=0, secret=secret, tls_cert=cert, tls_key=key) as master:
        a = pyccl.Communicator(master.address, connections=1, secret=secret, tls_ca=cert).connect(timeout=10)
        try:
            x = np.ones(16, np.float32)
            a.all_reduce(x)
            assert (x == 1).all() and a.world_size == 1
            # A CA that does not vouch for the master: refused before any frame.
            with pytest.raises(pyccl.AuthenticationError, match="certificate"):
                pyccl.Communicator(master.address, connections=1, secret=secret, tls_ca=other).connect(timeout=10)
            # Plain TCP to a TLS port: the handshake fails with a clear error, not a hang.
            with pytest.raises(pyccl.CCLError):
                pyccl.Communicator(master.address, connections=1, secret=secret).connect(timeout=3)
            assert a.world_size == 1 and a.lost is None
        finally:
            a.close()
