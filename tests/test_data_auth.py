"""Membership proofs on data ports (csrc/net/membership_proof.h) in a run
with a secret: members' ring links and state fetches prove the epoch's key;
a stranger, a forged proof, or the key of an earlier epoch is refused before
any frame is read, and the group never notices."""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import threading
import time

import numpy as np
import pyccl
import pytest
from pyccl import _core, wire

from group_helpers import all_reduce, group, vote_all

pytestmark = pytest.mark.timeout(90)

SECRET = b"a run secret for the data plane"
LINK_MAGIC, REQ_MAGIC = 0x4B4E4C50, 0x51525350


def test_core_hmac_matches_python() -> None:
    for key, data in [(b"k", b""), (b"x" * 100, b"y" * 1000), (SECRET, bytes(range(256)) * 3)]:
        assert _core.hmac_sha256(key, data) == hmac.new(key, data, hashlib.sha256).digest()


def _intrude(port: int, opening: bytes, proof: bytes | None, key: bytes | None = None) -> bytes:
    """Connect to a data port, send an opening (and, if the port challenges,
    ``proof``, or the proof a member holding ``key`` computes from the nonce);
    return what the port sent back before closing, its nonce included."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(5)
        nonce = s.recv(32) if proof is not None or key is not None else b""
        if key is not None:
            proof = hmac.new(key, b"pyccl-v1 data" + nonce + opening, hashlib.sha256).digest()
        s.sendall(opening + (proof or b""))
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return nonce + got


def test_a_run_with_a_secret_reduces_and_syncs_and_refuses_intruders(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("PYCCL_SECRET", raising=False)
    with pyccl.Master(host="127.0.0.1", port=0, secret=SECRET) as master:
        comms = group(master.address, 2, SECRET)
        try:
            xs = all_reduce(comms)
            assert all((x == 3).all() for x in xs)
            epoch = comms[0].epoch
            old_epoch, old_key = comms[0]._epoch_key
            assert old_epoch == epoch and len(old_key) == 32
            port = comms[1]._dp.port
            hello = struct.pack("<IB3xQQQII", LINK_MAGIC, 1, epoch, comms[0].peer_id, comms[1].peer_id, 0, 1)
            req = struct.pack("<IIQQQQ", REQ_MAGIC, 0, 0, 0, 16, epoch)
            # A forged proof and no proof at all: refused (the port sends its nonce and closes).
            assert len(_intrude(port, hello, b"\0" * 32)) == 32
            assert len(_intrude(port, req, b"\1" * 32)) == 32
            # A joiner makes a new epoch; the old epoch's key no longer opens anything.
            j = pyccl.Communicator(master.address, connections=2, secret=SECRET)
            t = threading.Thread(target=j.connect, kwargs={"timeout": 20})
            t.start()
            deadline = time.monotonic() + 20
            while comms[0].world_size < 3 and time.monotonic() < deadline:
                vote_all(comms)
            t.join(20)
            comms.append(j)
            new_epoch = comms[0].epoch
            assert new_epoch > epoch
            stale = struct.pack("<IB3xQQQII", LINK_MAGIC, 1, new_epoch, comms[0].peer_id, comms[1].peer_id, 0, 1)
            nonce_and_rest = b""
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(5)
                nonce = s.recv(32)
                proof = hmac.new(old_key, b"pyccl-v1 data" + nonce + stale, hashlib.sha256).digest()
                s.sendall(stale + proof)
                try:
                    nonce_and_rest = s.recv(4096)
                except (TimeoutError, ConnectionResetError):
                    pass
            assert nonce_and_rest == b""  # closed without a word
            # The group never noticed: same epoch, exact results, and a joiner's state sync works.
            assert comms[0].epoch == new_epoch
            xs = all_reduce(comms)
            assert all((x == 6).all() for x in xs)
            states = [pyccl.SharedState({"w": np.full(1 << 18, float(i == 2), np.float32)}) for i in range(3)]
            infos: list[object] = [None] * 3

            def sync(i: int) -> None:
                infos[i] = comms[i].sync_shared_state(states[i])

            threads = [threading.Thread(target=sync, args=(i,)) for i in range(3)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(30)
            assert all(info is not None for info in infos), infos
            assert len({s.hashes()["w"] for s in states}) == 1
        finally:
            for c in comms:
                c.close()


def test_an_open_run_does_not_challenge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYCCL_SECRET", raising=False)
    with pyccl.Master(host="127.0.0.1", port=0) as master:
        comms = group(master.address, 2, None)
        try:
            assert all((x == 3).all() for x in all_reduce(comms))
            assert comms[0]._epoch_key[1] == b""
            # No nonce: the port waits for a hello at once (a garbage one is just closed).
            assert _intrude(comms[1]._dp.port, b"\0" * 40, None) == b""
        finally:
            for c in comms:
                c.close()


def _with_key(port: int, opening: bytes, key: bytes) -> bytes:
    """What the port answers, after its nonce, to ``opening`` proven with ``key``."""
    return _intrude(port, opening, None, key)[32:]


def test_an_expelled_peer_loses_every_data_port_at_the_next_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYCCL_SECRET", raising=False)
    with pyccl.Master(host="127.0.0.1", port=0, secret=SECRET) as master:
        comms = group(master.address, 3, SECRET)
        try:
            assert all((x == 6).all() for x in all_reduce(comms))
            victim, survivors = comms[2], comms[:2]
            epoch, key = victim._epoch_key
            port = survivors[1]._dp.port
            req = struct.pack("<IIQQQQ", REQ_MAGIC, 0, 0, 0, 16, epoch)
            # While a member, its key opens a state request (answered: nothing published, a 16-byte reply).
            assert len(_with_key(port, req, key)) == 16
            # The master expels it (an invalid frame on its control connection).
            assert victim._control._sock is not None
            victim._control._sock.sendall(wire.encode({"type": "vote", "round": "not a number"}))
            deadline = time.monotonic() + 20
            while survivors[0].world_size != 2 and time.monotonic() < deadline:
                vote_all(survivors)
            new_epoch = survivors[0].epoch
            assert new_epoch > epoch and survivors[1].world_size == 2
            # It still holds the secret and the old epoch's key, but no key of
            # the new epoch: a state request or a ring link with the old key,
            # for the old epoch or the new one, is closed without a word.
            for e in (epoch, new_epoch):
                assert _with_key(port, struct.pack("<IIQQQQ", REQ_MAGIC, 0, 0, 0, 16, e), key) == b""
                link = struct.pack("<IB3xQQQII", LINK_MAGIC, 1, e, victim.peer_id, survivors[1].peer_id, 0, 1)
                assert _with_key(port, link, key) == b""
            xs = all_reduce(survivors)
            assert all((x == 3).all() for x in xs)
        finally:
            for c in comms:
                c.close()
