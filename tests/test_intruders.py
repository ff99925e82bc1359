"""The intruders of ``pyccl stress --intruder-rate`` (pyccl/stress/intruders.py),
one attempt of each attack against a real run: with a secret every one is
rejected and the group never notices; against an open run the same checks
see the intruder get in (so they can fail)."""

from __future__ import annotations

import pyccl
import pytest
from pyccl.stress.intruders import Attack, attack

from group_helpers import all_reduce, group, vote_all

pytestmark = pytest.mark.timeout(150)

SECRET = b"the run's secret, which intruders lack"


def _target(kind: Attack, master: pyccl.Master, comm: pyccl.Communicator) -> tuple[str, int]:
    if kind.on_data_port:
        return ("127.0.0.1", comm._dp.port)
    host, _, port = master.address.rpartition(":")
    return (host, int(port))


def test_every_attack_is_rejected_by_a_run_with_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYCCL_SECRET", raising=False)
    with pyccl.Master(host="127.0.0.1", port=0, secret=SECRET) as master:
        comms = group(master.address, 2, SECRET)
        try:
            assert all((x == 3).all() for x in all_reduce(comms))
            epoch = comms[0].epoch
            for i, kind in enumerate(Attack):
                rejected, leak, detail = attack(kind, _target(kind, master, comms[1]), SECRET, seed=i)
                assert rejected and not leak, (kind, leak, detail)
            # The group never noticed: same epoch, same members, exact results.
            vote_all(comms)
            assert [c.epoch for c in comms] == [epoch, epoch] and [c.world_size for c in comms] == [2, 2]
            assert all((x == 3).all() for x in all_reduce(comms))
        finally:
            for c in comms:
                c.close()


def test_the_checks_see_an_intruder_get_into_an_open_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYCCL_SECRET", raising=False)
    with pyccl.Master(host="127.0.0.1", port=0) as master:
        comms = group(master.address, 2, None)
        try:
            rejected, leak, _ = attack(Attack.JOIN_NO_SECRET, _target(Attack.JOIN_NO_SECRET, master, comms[0]),
                                       SECRET, seed=1)
            assert not rejected and leak.startswith(("admitted as peer", "welcomed as peer"))
            # An open data port serves a state request (here: "not available", a 16-byte reply header).
            rejected, leak, _ = attack(Attack.STATE_REQUEST, _target(Attack.STATE_REQUEST, master, comms[1]),
                                       SECRET, seed=2)
            assert not rejected and leak == "the data port answered 16 bytes"
        finally:
            for c in comms:
                c.close()
