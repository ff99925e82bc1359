"""DiLoCo in one process: fragments, schedule, retries, options (fast).

A fake Communicator (a world of one that records every call and can fail
ops on demand) shows exactly which collectives DiLoCo issues and when; one
test uses a real master with a single peer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pyccl  # noqa: E402
from pyccl.peer import ReduceInfo  # noqa: E402
from pyccl.diloco import DiLoCo, partition, sync_offsets  # noqa: E402
from pyccl.peer import SyncInfo  # noqa: E402

from diloco_helpers import H, make_inner, make_model, train_step  # noqa: E402


class _Handle:
    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def wait(self, timeout: float | None = None) -> ReduceInfo:
        return self._fn()


class FakeComm:
    """A world of one: reductions are the identity. ``fail`` holds how many
    upcoming all-reduces raise PeerFailure (input untouched, like the real one)."""

    def __init__(self, quantize: bool = False) -> None:
        self.world_size = 1
        self.peer_id = 1
        self.peers = (1,)
        self.calls: list[dict[str, Any]] = []
        self.fail = 0
        self.syncs = 0
        self.votes = 0
        self.step_of = lambda: -1
        if quantize:
            self.all_reduce = self._all_reduce_q  # type: ignore[method-assign]

    def _run(self, x: Any, out: Any, op: str, tag: int, kind: str, **kw: Any) -> ReduceInfo:
        self.calls.append({"kind": kind, "numel": int(x.numel()), "dtype": x.dtype, "op": op, "tag": tag,
                           "step": self.step_of(), **kw})
        if self.fail > 0:
            self.fail -= 1
            raise pyccl.PeerFailure("fake failure")
        if out is not None:
            out.copy_(x)
        return ReduceInfo(1, 0, 0, 0.0, 1, (1,))

    def all_reduce(self, x: Any, out: Any = None, op: str = "sum", tag: int = 0) -> ReduceInfo:
        return self._run(x, out, op, tag, "sync")

    def _all_reduce_q(self, x: Any, out: Any = None, op: str = "sum", tag: int = 0, quantize: Any = None) -> ReduceInfo:
        return self._run(x, out, op, tag, "sync", quantize=quantize)

    def all_reduce_async(self, x: Any, out: Any = None, op: str = "sum", tag: int = 0, **kw: Any) -> _Handle:
        # Record the launch now (program order); fail or complete at wait().
        self.calls.append({"kind": "async", "numel": int(x.numel()), "dtype": x.dtype, "op": op, "tag": tag,
                           "step": self.step_of(), **kw})
        fail = self.fail > 0
        if fail:
            self.fail -= 1
        snapshot = x.clone()

        def finish() -> ReduceInfo:
            if fail:
                raise pyccl.PeerFailure("fake failure")
            assert torch.equal(x, snapshot), "the input of an in-flight all-reduce changed"
            out.copy_(x)
            return ReduceInfo(1, 0, 0, 0.0, 1, (1,))

        return _Handle(finish)

    def update_topology(self) -> bool:
        self.votes += 1
        return False

    def sync_shared_state(self, state: Any) -> SyncInfo:
        self.syncs += 1
        return SyncInfo(state.revision, 0, 0, 0.0)


def _run(dl: DiLoCo, model: Any, comm: FakeComm, steps: int) -> list[Any]:
    comm.step_of = lambda: dl.inner_step
    infos = []
    for _ in range(steps):
        train_step(model, 0, dl.inner_step + 1)
        info = dl.step()
        if info is not None:
            infos.append(info)
    return infos


# ------------------------------------------------------------- fragments


def test_partition_is_contiguous_balanced_and_deterministic():
    sizes = [100, 10, 10, 50, 50, 30, 1, 200]
    for f in range(1, len(sizes) + 1):
        groups = partition(sizes, f)
        assert len(groups) == f and all(groups)
        assert [i for g in groups for i in g] == list(range(len(sizes)))
        assert groups == partition(list(sizes), f)
    assert partition([10] * 8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert partition([1, 1, 1, 1000], 2) == [[0, 1, 2], [3]]
    with pytest.raises(ValueError):
        partition([1, 2], 3)
    assert sync_offsets(10, 3) == [0, 3, 6]


def test_streaming_fragments_sync_at_their_steps_with_a_fraction_of_the_bytes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])
    comm = FakeComm()
    F, Hs = 3, 6
    dl = DiLoCo(model, make_inner(model), comm, sync_every=Hs, fragments=F)
    comm.step_of = lambda: dl.inner_step
    infos = []
    for _ in range(4 * Hs):
        model(torch.randn(4, 16)).square().mean().backward()
        info = dl.step()
        if info is not None:
            infos.append(info)
    assert [(i.inner_step, i.fragment) for i in infos] == [
        (s, (s % Hs) * F // Hs) for s in range(1, 4 * Hs + 1) if (s % Hs) in sync_offsets(Hs, F)
    ]
    sizes = {}
    for c in comm.calls:
        frag = next(i.fragment for i in infos if i.inner_step == c["step"])
        sizes[frag] = sizes.get(frag, 0) + c["numel"]
    total = sum(p.numel() for p in model.parameters())
    per_round = {f: n // 4 for f, n in sizes.items()}
    assert sum(per_round.values()) == total
    assert max(per_round.values()) <= total / F * 1.1  # peak bytes per outer step ~ 1/F of the model
    # Joiners are admitted and the state synced once per round, at fragment 0's step (+1 in the constructor).
    assert comm.votes == comm.syncs == 1 + 4
    assert dl.state.revision == 4 and dl.outer_step == 4 * F


# ---------------------------------------------------------------- retries


def test_sync_outer_all_reduce_is_retried_after_peer_failure():
    ref_model, model = make_model(), make_model()
    ref_comm, comm = FakeComm(), FakeComm()
    ref = DiLoCo(ref_model, make_inner(ref_model), ref_comm, sync_every=H)
    dl = DiLoCo(model, make_inner(model), comm, sync_every=H)
    _run(ref, ref_model, ref_comm, 2 * H)
    comm.fail = 2
    infos = _run(dl, model, comm, 2 * H)
    assert infos[0].retries == 2 and infos[1].retries == 0
    assert dl.state_hash() == ref.state_hash()


def test_delayed_background_all_reduce_is_redone_after_peer_failure():
    ref_model, model = make_model(), make_model()
    ref_comm, comm = FakeComm(), FakeComm()
    ref = DiLoCo(ref_model, make_inner(ref_model), ref_comm, sync_every=H, delayed=True)
    dl = DiLoCo(model, make_inner(model), comm, sync_every=H, delayed=True)
    _run(ref, ref_model, ref_comm, 3 * H)
    infos = _run(dl, model, comm, H)        # launches the first background all-reduce
    comm.fail = 1                           # the one launched at the second outer step will fail
    infos += _run(dl, model, comm, 2 * H)
    assert [i.applied for i in infos] == [False, True, True]
    assert infos[2].retries == 1
    kinds = [(c["kind"], c["op"]) for c in comm.calls]
    assert ("sync", "sum") in kinds  # the redo is synchronous, over the survivors
    assert dl.state_hash() == ref.state_hash()
    dl.finish()
    ref.finish()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


def test_delayed_applies_nothing_at_the_first_outer_step_and_counts_contributors():
    model = make_model()
    comm = FakeComm()
    dl = DiLoCo(model, make_inner(model), comm, sync_every=H, delayed=True)
    theta0 = [t.clone() for _, t in dl.global_parameters()]
    infos = _run(dl, model, comm, H)
    assert not infos[0].applied
    assert all(torch.equal(a, b) for a, b in zip(theta0, (t for _, t in dl.global_parameters())))
    counts = [c for c in comm.calls if c["numel"] == 1 and c["kind"] == "async"]
    assert len(counts) == 1 and counts[0]["op"] == "sum"


# ---------------------------------------------------------------- options


def test_quantize_is_passed_to_the_float32_pseudo_gradient_reduces_only():
    model = make_model()  # float32 and float64 parameters
    comm = FakeComm(quantize=True)
    dl = DiLoCo(model, make_inner(model), comm, sync_every=H, delayed=True, quantize="uint8")
    _run(dl, model, comm, 2 * H)
    f32 = [c for c in comm.calls if c["numel"] > 1 and c["dtype"] == torch.float32]
    other = [c for c in comm.calls if c["numel"] > 1 and c["dtype"] != torch.float32]
    counts = [c for c in comm.calls if c["numel"] == 1]
    assert f32 and all(c.get("quantize") == "uint8" for c in f32)
    assert other and all("quantize" not in c for c in other)
    assert counts and all("quantize" not in c for c in counts)


def test_quantize_without_core_support_is_a_clear_error():
    model = make_model()
    with pytest.raises(NotImplementedError, match="quantize"):
        DiLoCo(model, make_inner(model), FakeComm(), sync_every=H, quantize="uint8")


def test_real_communicator_quantize_support_is_detected():
    import inspect
    import types

    from pyccl.diloco._diloco import _quantize_supported

    has = "quantize" in inspect.signature(pyccl.Communicator.all_reduce).parameters
    assert _quantize_supported(types.SimpleNamespace(all_reduce=pyccl.Communicator.all_reduce)) == has


def test_outer_optimizer_factory_and_state_in_shared_state():
    model = make_model()
    comm = FakeComm()
    dl = DiLoCo(model, make_inner(model), comm, sync_every=H,
                outer_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.5, 0.9)))
    keys = dl.state.keys()
    assert "diloco.counters" in keys
    assert any(".params.float32" in k for k in keys) and any(".params.float64" in k for k in keys)
    assert any(".opt.exp_avg." in k for k in keys) and any(".opt.step." in k for k in keys)
    _run(dl, model, comm, 3 * H)
    steps = [dl.outer_optimizer.state[p]["step"] for _, p in dl.global_parameters()]
    assert all(float(s) == 3 for s in steps)
    assert int(dl.state["diloco.counters"][0]) == 3 * H and dl.state.revision == 3

    class Custom(torch.optim.SGD):
        pass

    with pytest.raises(ValueError, match="state"):
        DiLoCo(model, make_inner(model), comm, sync_every=H,
               outer_optimizer=lambda ps: torch.optim.RMSprop(ps, lr=0.1))
    DiLoCo(model, make_inner(model), comm, sync_every=H, outer_optimizer=lambda ps: Custom(ps, lr=0.5, momentum=0.5))


def test_bad_arguments():
    model = make_model()
    comm = FakeComm()
    with pytest.raises(ValueError):
        DiLoCo(model, make_inner(model), comm, sync_every=0)
    with pytest.raises(ValueError):
        DiLoCo(model, make_inner(model), comm, sync_every=4, fragments=5)
    with pytest.raises(ValueError):
        DiLoCo(model, make_inner(model), comm, sync_every=4, fragments=6)


@pytest.mark.timeout(60)
def test_alone_with_a_real_master_keeps_training():
    with pyccl.Master(host="127.0.0.1", port=0) as master:
        comm = pyccl.Communicator(master.address, connections=1)
        comm.connect(timeout=10)
        try:
            for delayed in (False, True):
                model = make_model()
                # A one-step-stale update with momentum 0.9 overshoots on this tiny problem: no momentum for delayed.
                outer = (lambda ps: torch.optim.SGD(ps, lr=0.7)) if delayed else None
                dl = DiLoCo(model, make_inner(model), comm, sync_every=H, delayed=delayed, outer_optimizer=outer)
                losses = []
                for _ in range(10 * H):
                    losses.append(train_step(model, 0, dl.inner_step + 1))
                    dl.step()
                dl.finish()
                assert dl.state.revision == 10
                assert np.mean(losses[-H:]) < np.mean(losses[:H])
        finally:
            comm.close()
