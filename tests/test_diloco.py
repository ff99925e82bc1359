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
from pyccl.diloco import DiLoCo, partition, sync_offsets  # noqa: E402
from pyccl.diloco._compress import ErrorFeedback, Int4Packer  # noqa: E402
from pyccl.peer import ReduceInfo, SyncInfo  # noqa: E402

from diloco_helpers import H, make_inner, make_model, make_wide_model, train_step  # noqa: E402


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

    def all_gather(self, x: Any, out: Any, tag: int = 0) -> ReduceInfo:
        return self._run(x, out, "gather", tag, "sync")

    def all_gather_async(self, x: Any, out: Any, tag: int = 0) -> _Handle:
        info = self._run(x, out, "gather", tag, "async")
        return _Handle(lambda: info)

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


# ------------------------------------------------------ delayed: eager / look-ahead


@pytest.mark.parametrize("delayed", ["eager", "lookahead"])
def test_eager_alone_is_sync_diloco_bit_for_bit(delayed):
    """With one peer the stand-in for the average in flight is the average
    itself, so each inner phase starts exactly where sync DiLoCo starts it:
    the same losses, bit for bit, and after finish() the same model."""
    runs = {}
    for mode in (False, delayed):
        model = make_model()
        comm = FakeComm()
        dl = DiLoCo(model, make_inner(model), comm, sync_every=H, delayed=mode)
        losses = []
        for _ in range(6 * H):
            losses.append(train_step(model, 0, dl.inner_step + 1))
            dl.step()
        dl.finish()
        runs[mode] = (losses, [p.detach().clone() for p in model.parameters()])
    assert runs[False][0] == runs[delayed][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[delayed][1]))


def test_eager_look_ahead_leaves_the_shared_state_alone():
    """The trial step writes only the local start point: the global parameters
    and the momentum equal plain delayed mode's (same averages applied)."""
    a, b = make_model(), make_model()
    ca, cb = FakeComm(), FakeComm()
    eager = DiLoCo(a, make_inner(a), ca, sync_every=H, delayed="eager")
    naive = DiLoCo(b, make_inner(b), cb, sync_every=H, delayed=True)
    train_step(a, 0, 1)
    train_step(b, 0, 1)
    for _ in range(H - 1):
        eager.step()
        naive.step()
        train_step(a, 0, 1)
        train_step(b, 0, 1)
    eager.step()
    naive.step()
    # One outer step: nothing applied yet in either; eager's model moved to its look-ahead.
    assert eager.state_hash() == naive.state_hash()
    assert not all(torch.equal(p, g) for p, (_, g) in zip(a.parameters(), eager.global_parameters()))
    assert all(torch.equal(p, g) for p, (_, g) in zip(b.parameters(), naive.global_parameters()))


# ------------------------------------------------------ streaming sync delay


def test_sync_delay_lands_each_fragment_tau_steps_after_its_sync():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    comm = FakeComm()
    Hs, F, tau = 8, 2, 3
    dl = DiLoCo(model, make_inner(model), comm, sync_every=Hs, fragments=F, sync_delay=tau, mixing=0.0)
    comm.step_of = lambda: dl.inner_step
    infos = []
    for _ in range(3 * Hs):
        model(torch.randn(4, 8)).square().mean().backward()
        info = dl.step()
        if info is not None:
            infos.append(info)
    syncs = [c["step"] for c in comm.calls if c["kind"] == "async" and c["numel"] > 1]
    assert syncs == [s for s in range(1, 3 * Hs + 1) if s % Hs in (0, Hs // F)]
    applied = [(i.inner_step, i.fragment) for i in infos if i.applied]
    # fragment 1 is synced at 4, 12, 20 and lands at 7, 15, 23; fragment 0 at 8, 16 (24: at finish())
    assert applied == [(7, 1), (11, 0), (15, 1), (19, 0), (23, 1)]
    # mixing 0: after a landing the fragment's local parameters are the global ones
    dl.finish()
    assert all(torch.equal(p, g) for p, (_, g) in zip(model.parameters(), dl.global_parameters()))


def test_delayed_overlap_is_half_a_period_rebased():
    runs = []
    for opts in ({"delayed": "overlap"}, {"sync_delay": H // 2, "mixing": "rebase"}):
        model = make_model()
        dl = DiLoCo(model, make_inner(model), FakeComm(), sync_every=H, **opts)
        assert dl.sync_delay == H // 2 and dl.mode == "stream" and dl.rebase and not dl.delayed
        _run(dl, model, dl.comm, 3 * H)
        runs.append(dl.state_hash())
    assert runs[0] == runs[1]
    model = make_model()
    dl = DiLoCo(model, make_inner(model), FakeComm(), sync_every=20, delayed="overlap", fragments=4)
    assert dl.sync_delay == 5 and dl.rebase  # a fragment's all-reduce overlaps the steps until the next sync


def test_sync_delay_mixes_local_and_global():
    """At a landing, local = alpha * local + (1 - alpha) * global: compared with
    alpha = 1 (local untouched) and alpha = 0 (local = global) on the same run."""
    models, dls = {}, {}
    for alpha in (1.0, 0.0, 0.25):
        model = make_model()
        dl = DiLoCo(model, make_inner(model), FakeComm(), sync_every=H, sync_delay=1, mixing=alpha)
        for _ in range(H + 1):  # the sync at H, the landing at H + 1
            train_step(model, 0, dl.inner_step + 1)
            info = dl.step()
        assert info is not None and info.applied and info.inner_step == H + 1
        models[alpha], dls[alpha] = model, dl
    assert dls[1.0].state_hash() == dls[0.0].state_hash() == dls[0.25].state_hash()
    for p1, p0, pm, (_, g) in zip(models[1.0].parameters(), models[0.0].parameters(), models[0.25].parameters(),
                                  dls[0.25].global_parameters()):
        assert torch.equal(p0, g)
        assert torch.equal(pm, p1.detach().clone().mul_(0.25).add_(g, alpha=0.75))
    assert not all(torch.equal(p1, p0) for p1, p0 in zip(models[1.0].parameters(), models[0.0].parameters()))


# ------------------------------------------------------ quantization + error feedback


@pytest.mark.parametrize("quantize", ["uint8", "int4"])
def test_error_feedback_zero_pseudo_gradient_keeps_the_residual_sum(quantize):
    g = torch.Generator().manual_seed(1)
    ef = ErrorFeedback(quantize, 3000)
    ef.residual.copy_(torch.randn(3000, generator=g) * 1e-3)
    before = ef.residual.clone()
    x = torch.zeros(3000)
    ef.prepare(x)                     # x is now what is sent: 0 + residual
    assert torch.equal(x, before)
    sent = x - ef.residual            # what the receivers decode
    # nothing lost: decoded + new residual == old residual (up to one float32 rounding)
    assert torch.allclose(sent + ef.residual, before, rtol=0, atol=1e-9)
    assert abs(float((sent + ef.residual).double().sum() - before.double().sum())) < 1e-7
    assert float(ef.residual.abs().max()) > 0  # quantization did lose something, which the residual keeps


@pytest.mark.parametrize("quantize", ["uint8", "int4"])
def test_error_feedback_has_no_drift_and_without_it_the_error_grows(quantize):
    """Sending the same small pseudo-gradient many times: with error feedback
    the total decoded equals the total input up to one residual; without it
    the quantization error adds up step after step."""
    g = torch.Generator().manual_seed(2)
    pg = torch.randn(2048, generator=g) * 1e-3
    pg[0] = 1.0  # one large value makes the small ones quantize coarsely
    totals = {}
    for fb in (True, False):
        ef = ErrorFeedback(quantize, 2048, feedback=fb)
        total = torch.zeros(2048, dtype=torch.float64)
        for _ in range(100):
            x = pg.clone()
            ef.prepare(x)
            total += (x - ef.residual).double() if fb else _decoded(ef, x).double()
        totals[fb] = float((total - 100 * pg.double()).abs().max())
        if fb:
            assert torch.allclose((total - 100 * pg.double()).float(), -ef.residual, atol=1e-5)
    levels = 255 if quantize == "uint8" else 15
    step = float(pg.max() - pg.min()) / levels
    assert totals[True] <= step * 1.01, totals        # bounded by one quantization step, however long
    assert totals[False] > 10 * totals[True], totals  # grows with every step


def _decoded(ef: ErrorFeedback, x: Any) -> Any:
    out = torch.empty_like(x)
    if ef.packer is not None:
        ef.packer.decode(ef.packed, out)
    else:
        ef._u8.roundtrip(x, out)
    return out


def test_int4_packing_is_exact_and_the_gathered_sum_is_in_rank_order():
    g = torch.Generator().manual_seed(3)
    n = 1500  # not a multiple of the block
    packer = Int4Packer(n)
    xs = [torch.randn(n, generator=g) for _ in range(3)]
    xs[2][:600] = 0.25  # a constant block decodes exactly
    packed, decoded = [], []
    for x in xs:
        buf = torch.zeros(packer.nbytes, dtype=torch.uint8)
        dec = torch.empty(n)
        packer.encode(x, buf, dec)
        again = torch.empty(n)
        packer.decode(buf, again)
        assert torch.equal(dec, again)
        assert float((dec - x).abs().max()) <= float(x.max() - x.min()) / 15 / 2 * 1.0001
        packed.append(buf)
        decoded.append(dec)
    assert torch.equal(decoded[2][:512], torch.full((512,), 0.25))
    out = torch.empty(n)
    assert packer.sum_gathered(torch.cat(packed), out) == 3
    assert torch.equal(out, (decoded[0] + decoded[1]) + decoded[2])
    with pytest.raises(ValueError, match="NaN"):
        packer.encode(torch.full((n,), float("nan")), packed[0], out)


def test_int4_sends_packed_codes_and_a_joiner_residual_starts_at_zero():
    model = make_wide_model()
    comm = FakeComm()
    dl = DiLoCo(model, make_inner(model), comm, sync_every=H, quantize="int4")
    assert all(float(r.abs().max()) == 0 for r in dl.residuals())
    comm.step_of = lambda: dl.inner_step
    _run(dl, model, comm, 2 * H)
    gathers = [c for c in comm.calls if c["op"] == "gather"]
    n = sum(p.numel() for p in model.parameters())
    assert len(gathers) == 2 and gathers[0]["dtype"] == torch.uint8
    assert n // 2 <= gathers[0]["numel"] <= (n + 512) // 2 + 8 * (n // 512 + 1)  # codes padded to a block + headers
    assert any(float(r.abs().max()) > 0 for r in dl.residuals())


def test_new_options_are_validated():
    model = make_model()
    comm = FakeComm()
    with pytest.raises(ValueError, match="sync_delay"):
        DiLoCo(model, make_inner(model), comm, sync_every=4, delayed=True, sync_delay=2)
    with pytest.raises(ValueError, match="sync_delay"):
        DiLoCo(model, make_inner(model), comm, sync_every=4, sync_delay=4)
    with pytest.raises(ValueError, match="mixing"):
        DiLoCo(model, make_inner(model), comm, sync_every=4, sync_delay=1, mixing=1.5)
    with pytest.raises(ValueError, match="delayed"):
        DiLoCo(model, make_inner(model), comm, sync_every=4, delayed="later")
    with pytest.raises(ValueError, match="quantize"):
        DiLoCo(model, make_inner(model), comm, sync_every=4, quantize="int2")
