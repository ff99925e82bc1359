"""Unit tests of the torch backend's pure parts: op/dtype mapping and the
point-to-point side channel (two hubs in this process, no torch group)."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from pyccl.errors import DrainKind, PeerFailure  # noqa: E402
from pyccl.torch import _ops, _p2p  # noqa: E402
from pyccl.torch._health import GroupHealth  # noqa: E402
from pyccl.torch._lowering import rows as _rows  # noqa: E402
from pyccl.torch._work import BackendError, Completer, PendingOp, PycclWork  # noqa: E402

R = dist.ReduceOp


@pytest.mark.parametrize(
    "op,dtype,core,gather",
    [
        (R.SUM, torch.float32, "sum", False),
        (R.AVG, torch.bfloat16, "avg", False),
        (R.PRODUCT, torch.int64, "prod", False),
        (R.SUM, torch.bool, "max", False),
        (R.PRODUCT, torch.bool, "min", False),
        (R.BXOR, torch.bool, None, True),
        (R.BAND, torch.int32, None, True),
        (R.SUM, torch.complex64, "sum", False),
        (R.PRODUCT, torch.complex64, None, True),
        (R.SUM, torch.uint32, None, True),
    ],
)
def test_reduction_plan(op, dtype, core, gather) -> None:
    plan = _ops.reduction_plan(op, dtype)
    assert plan.core_op == core
    assert (plan.gather_reduce is not None) == gather


def test_premul_and_refusals() -> None:
    plan = _ops.reduction_plan(dist._make_nccl_premul_sum(0.5), torch.float16)
    assert plan.core_op == "sum" and plan.premul == 0.5
    for op, dtype in ((R.BAND, torch.float32), (R.MIN, torch.complex64), (R.AVG, torch.bool)):
        with pytest.raises(ValueError, match="pyccl"):
            _ops.reduction_plan(op, dtype)
    with pytest.raises(ValueError, match="PREMUL_SUM"):
        _ops.reduction_plan(dist._make_nccl_premul_sum(2.0), torch.int32)


def test_gather_reduce_folds_in_rank_order() -> None:
    g = torch.tensor([[0b1100, 3], [0b1010, 5], [0b0110, 6]], dtype=torch.int32)
    assert _ops.reduction_plan(R.BXOR, torch.int32).gather_reduce(g).tolist() == [0b0000, 0]
    assert _ops.reduction_plan(R.BOR, torch.int32).gather_reduce(g).tolist() == [0b1110, 7]


def test_byte_view_and_rows() -> None:
    t = torch.arange(6, dtype=torch.bfloat16)
    assert _ops.byte_view(t).numel() == 12 and _ops.byte_view(t).dtype == torch.uint8
    assert _ops.byte_view(torch.tensor(3.0)).numel() == 4
    assert _rows(torch.empty(6, 2), None, 3, "input") == [(0, 2), (2, 4), (4, 6)]
    assert _rows(torch.empty(6, 2), [1, 0, 5], 3, "input") == [(0, 1), (1, 1), (1, 6)]
    with pytest.raises(ValueError):
        _rows(torch.empty(5), None, 2, "input")


class _FakeComm:
    """What GroupHealth reads of a Communicator: its members and whether it lost the master."""

    def __init__(self, peers: tuple[int, ...]) -> None:
        self.peers, self.epoch, self.lost = peers, 1, None


def test_health_names_the_lost_rank_and_keeps_the_core_reason_not_its_retry_advice() -> None:
    comm = _FakeComm((11, 12, 13))
    health = GroupHealth("g", 0, 3, [0, 1, 2], 0, "127.0.0.1:1")
    health.formed(comm)  # type: ignore[arg-type]
    assert health.check() is None
    comm.peers, comm.epoch = (11, 12), 2
    completer = Completer("t", health.translate)
    try:
        op = PendingOp("allreduce", PycclWork("allreduce", 5.0), completer)
        exc = PeerFailure("all_reduce aborted because ...; world size is now 2: retry the call", epoch=1,
                          lost_peers=(13,), kind=DrainKind.PEER, op="all_reduce", reason="peer 13 is gone")
        err = health.translate(op, exc)
    finally:
        completer.stop()
    assert isinstance(err, BackendError) and err.__cause__ is exc
    assert "lost peer rank 2" in str(err) and "[core: peer 13 is gone]" in str(err) and "retry" not in str(err)
    assert health.check() is not None and "rank 2" in str(health.broken)


class _Box:
    def __init__(self) -> None:
        self.ev = threading.Event()
        self.src = None
        self.err = None

    def recv_done(self, src, err) -> None:
        self.src, self.err = src, err
        self.ev.set()

    def send_done(self, err) -> None:
        self.err = err
        self.ev.set()


def test_side_channel_order_anysource_mismatch_and_failure() -> None:
    hubs = [_p2p.Hub("127.0.0.1"), _p2p.Hub("127.0.0.1")]
    health = {"why": None}
    eps = [_p2p.Endpoint(h, "g", r, lambda peer: hubs[peer].address, lambda: health["why"]) for r, h in enumerate(hubs)]
    for h, ep in zip(hubs, eps):
        h.register(ep)
    try:
        # In-order delivery on one tag; the first message arrives before its receive is posted.
        sent = [torch.full((5,), float(i)) for i in range(3)]
        boxes = []
        for t in sent:
            b = _Box()
            eps[0].send(_ops.byte_view(t), 1, 7, _p2p.KIND_P2P, b.send_done)
            boxes.append(b)
        for b in boxes:
            assert b.ev.wait(5) and b.err is None
        for i in range(3):
            out, b = torch.empty(5), _Box()
            eps[1].post_recv(_ops.byte_view(out), 0 if i else -1, 7, _p2p.KIND_P2P, b.recv_done)
            assert b.ev.wait(5) and b.err is None and b.src == 0
            assert torch.equal(out, sent[i])
        # A receive posted first gets the bytes straight into the tensor; kinds never mix.
        out, b = torch.empty(3, dtype=torch.int64), _Box()
        eps[0].post_recv(_ops.byte_view(out), 1, 1, _p2p.KIND_A2A, b.recv_done)
        eps[1].send(_ops.byte_view(torch.tensor([9, 8, 7])), 0, 1, _p2p.KIND_P2P, lambda e: None)
        eps[1].send(_ops.byte_view(torch.tensor([1, 2, 3])), 0, 1, _p2p.KIND_A2A, lambda e: None)
        assert b.ev.wait(5) and b.err is None and out.tolist() == [1, 2, 3]
        # Size mismatch: a clear error, not corruption.
        out, b = torch.empty(2), _Box()
        eps[0].post_recv(_ops.byte_view(out), 1, 1, _p2p.KIND_P2P, b.recv_done)
        assert b.ev.wait(5) and "bytes" in str(b.err)
        # A broken group fails pending receives (the group checks on every membership event).
        out, b = torch.empty(2), _Box()
        eps[0].post_recv(_ops.byte_view(out), 1, 99, _p2p.KIND_P2P, b.recv_done)
        eps[0].check()
        assert not b.ev.is_set()  # whole: nothing to fail
        health["why"] = "pyccl: group broken"
        eps[0].check()
        assert b.ev.wait(5) and "broken" in str(b.err)
    finally:
        for h, ep in zip(hubs, eps):
            ep.fail_all("closing", close=True)
            h.unregister(ep)
            h.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("pyccl-p2p")]


@pytest.mark.parametrize("sender_key", [b"k" * 32, b"w" * 32])
def test_side_channel_proves_membership_in_a_run_with_a_secret(sender_key: bytes) -> None:
    hubs = [_p2p.Hub("127.0.0.1", authenticate=True), _p2p.Hub("127.0.0.1", authenticate=True)]
    eps = [_p2p.Endpoint(h, "g", r, lambda peer: hubs[peer].address, lambda: None) for r, h in enumerate(hubs)]
    eps[0].credential = lambda: sender_key
    eps[1].credential = lambda: b"k" * 32
    for h, ep in zip(hubs, eps):
        h.register(ep)
    try:
        out, got = torch.empty(4), _Box()
        eps[1].post_recv(_ops.byte_view(out), 0, 3, _p2p.KIND_P2P, got.recv_done)
        sent = _Box()
        eps[0].send(_ops.byte_view(torch.arange(4.0)), 1, 3, _p2p.KIND_P2P, sent.send_done)
        if sender_key == b"k" * 32:
            assert got.ev.wait(5) and got.err is None and out.tolist() == [0.0, 1.0, 2.0, 3.0]
        else:
            # The receiver refuses the connection: the message never lands.
            assert not got.ev.wait(1.0)
    finally:
        for h, ep in zip(hubs, eps):
            ep.fail_all("closing", close=True)
            h.unregister(ep)
            h.close()
