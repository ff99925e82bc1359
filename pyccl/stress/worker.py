"""The stress peer: one spawned process running a training-like loop.

Loop (one *step*), repeated until the orchestrator says ``stop``::

    update_topology()
    sync_shared_state(state)               # revision R afterwards, same on every member
    concurrency x all_reduce_async(...)    # distinct tags, inputs from (seed, R, tag, peer id)
    wait for each; check each result exactly against the reduction over ReduceInfo.peers
    if every op succeeded: deterministic update of the state; state.revision += 1

Every check the peer can do by itself is done here and reported as a
*finding* (a violation): a result that is not bit-identical to the exact
expected reduction, an input changed by a failed op (guarantee 2), a
MismatchError (the inputs always match, so it is never legitimate). Result
and state hashes go to the orchestrator, which checks them across peers.

When the Communicator is lost (expelled after a SIGSTOP, say) or a sync
fails (every holder died mid-transfer), the peer's revision can no longer be
trusted to match the group's, so it closes the Communicator and joins again
as a new member, keeping its SharedState arrays: the next sync brings it up
to date. In-place and out-of-place calls alternate by tag.

The debug switch ``corrupt`` makes this peer add 1 to one element of one
result (once, after a few complete steps, before checking and hashing) to
prove that the tool catches a wrong result.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyccl.stress import protocol
from pyccl.stress.workload import Workload, array_hash, combined_state_hash, op_for_tag, state_arrays, update_state

__all__ = ["WorkerSpec", "main"]

log = logging.getLogger("pyccl.stress.worker")

_CORRUPT_AFTER_STEPS = 3


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a peer process needs (pickled to the spawned child)."""

    index: int
    master: str
    telemetry: tuple[str, int]
    data_port: int
    advertise: tuple[str, int] | None
    connections: int
    concurrency: int
    count: int
    dtype: str
    op: str
    seed: int
    max_world: int
    state_size: int
    pace: float
    log_path: str
    connect_timeout: float = 60.0
    corrupt: bool = False
    secret: bytes | None = None  # None: PYCCL_SECRET from the environment, if any
    optimize_every: int = 0  # > 0: optimize_topology() at every N-th revision
    data_host: str | None = None  # own loopback address (a geography run)
    region: str | None = None


def main(spec: WorkerSpec) -> None:
    """Process entry point: run the loop; exit 0 after ``stop``, 1 after an unexpected error."""
    _die_with_parent()
    _redirect_output(spec.log_path)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s peer[{spec.index}] %(levelname)s %(name)s: %(message)s")
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    tel = protocol.TelemetryClient(spec.telemetry[0], spec.telemetry[1], spec.index)
    code = 0
    try:
        _Peer(spec, tel).run()
    except BaseException:  # noqa: BLE001 - reported to the orchestrator, then the process exits
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        tel.send({"type": "error", "text": text[-60000:]})
        code = 1
    finally:
        tel.send({"type": "bye"})
        tel.close()
    sys.stdout.flush()
    os._exit(code)  # do not wait for stray non-daemon threads of a broken Communicator


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the orchestrator dies (no orphans)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        os._exit(2)


def _redirect_output(path: str) -> None:
    """Send fds 1 and 2 (Python and the C++ core's log) to ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class _Lost(Exception):
    """The Communicator is unusable; rejoin with a new one."""


class _Peer:
    def __init__(self, spec: WorkerSpec, tel: protocol.TelemetryClient) -> None:
        import pyccl

        self.spec = spec
        self.tel = tel
        self.stop = tel.stop_requested
        self.wl = Workload(spec.seed, spec.dtype, spec.count, spec.op, spec.max_world)
        self.arrays = state_arrays(spec.state_size)
        self.state = pyccl.SharedState(self.arrays, revision=0)
        self.tags = list(range(spec.concurrency))
        self.x = [np.empty(spec.count, dtype=self.wl.dtype) for _ in self.tags]
        self.out = [None if self._inplace(t) else np.empty(spec.count, dtype=self.wl.dtype) for t in self.tags]
        self.complete_steps = 0
        self.corrupted = False
        self.peer_id = 0  # of the current Communicator; 0 while connecting

    @staticmethod
    def _inplace(tag: int) -> bool:
        return tag % 2 == 0

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        import pyccl

        while not self.stop.is_set():
            comm = pyccl.Communicator(
                self.spec.master, connections=self.spec.connections, name=f"stress-{self.spec.index}",
                data_port=self.spec.data_port, advertise=self.spec.advertise, secret=self.spec.secret,
                data_host=self.spec.data_host, region=self.spec.region,
            )
            self.peer_id = 0
            self._phase("connect", self.state.revision, 0, ())
            try:
                comm.connect(timeout=self.spec.connect_timeout)
            except pyccl.CCLError as exc:
                log.warning("connect failed: %s", exc)
                comm.close()
                self.stop.wait(0.5)
                continue
            self.peer_id = comm.peer_id
            self.tel.send({"type": "admitted", "peer_id": comm.peer_id, "epoch": comm.epoch,
                           "members": list(comm.peers)})
            try:
                self._member_loop(comm)
            except _Lost as exc:
                self.tel.send({"type": "lost", "peer_id": comm.peer_id, "reason": str(exc)[:4000]})
            finally:
                comm.close()

    def _member_loop(self, comm: Any) -> None:
        import pyccl

        while not self.stop.is_set():
            self._phase("topology", self.state.revision, comm.epoch, comm.peers)
            every = self.spec.optimize_every
            try:
                # Members at one program position hold one revision, so they
                # agree on which of the two they call (a disagreement would
                # only cost the optimization: the first vote decides the round).
                if every > 0 and self.state.revision % every == every - 1:
                    comm.optimize_topology(seconds=0.1, max_bytes=4 << 20)
                else:
                    comm.update_topology()
            except pyccl.CCLError as exc:
                raise _Lost(f"update_topology: {exc}") from exc
            self._phase("sync", self.state.revision, comm.epoch, comm.peers)
            try:
                sync = comm.sync_shared_state(self.state)
            except pyccl.PeerFailure as exc:
                # Aborted on every member alike (a master failover): the
                # revision is unchanged, so go round again and sync anew.
                log.info("sync aborted: %s", exc)
                continue
            except pyccl.CCLError as exc:
                if _is_lost(comm):
                    raise _Lost(f"sync_shared_state: {exc}") from exc
                # Our revision may now lag the group's: inputs would no longer
                # line up, so leave and join again (the next sync catches up).
                self.tel.send({"type": "sync_failed", "peer_id": comm.peer_id, "reason": str(exc)[:4000]})
                return
            self.tel.send({
                "type": "sync", "peer_id": comm.peer_id, "rev": self.state.revision,
                "hash": combined_state_hash(self.state.hashes()), "epoch": comm.epoch,
                "members": list(comm.peers), "rx": sync.rx_bytes, "seconds": sync.seconds,
            })
            lost = self._step(comm)
            if lost:
                raise _Lost(lost)
            if self.spec.pace > 0:
                self._phase("idle", self.state.revision, comm.epoch, comm.peers)
                self.stop.wait(self.spec.pace)

    def _step(self, comm: Any) -> str | None:
        """One round of concurrent all-reduces; returns a reason if the Communicator was lost."""
        import pyccl

        rev = self.state.revision
        me = comm.peer_id
        self._phase("ops", rev, comm.epoch, comm.peers)
        patterns = [self.wl.pattern(rev, t) for t in self.tags]
        for t in self.tags:
            self.wl.fill_input(self.x[t], patterns[t], rev, t, me)
        t0 = time.monotonic()
        started = []
        for t in self.tags:
            e0 = comm.epoch
            handle = comm.all_reduce_async(self.x[t], out=self.out[t], op=op_for_tag(self.spec.op, t), tag=t)
            started.append((t, handle, e0, comm.epoch))
        outcomes: list[protocol.OpOutcome] = []
        findings: list[dict[str, Any]] = []
        results: list[np.ndarray] = []
        members: set[int] = set()
        lost: str | None = None
        for t, handle, e0, e1 in started:
            try:
                info = handle.wait()
            except pyccl.MismatchError as exc:
                outcomes.append(protocol.OpOutcome(t, "mismatch", e0=e0, e1=e1, reason=str(exc)))
                findings.append({"kind": "mismatch_error", "tag": t, "rev": rev, "epoch": e0, "detail": str(exc)[:500]})
                self._check_input(findings, t, patterns[t], rev, me, e0, "after MismatchError")
                continue
            except pyccl.PeerFailure as exc:
                outcomes.append(protocol.OpOutcome(t, "peer_failure", e0=e0, e1=e1, reason=str(exc)))
                self._check_input(findings, t, patterns[t], rev, me, e0, "after PeerFailure")
                continue
            except pyccl.CCLError as exc:
                if _is_lost(comm):
                    lost = lost or f"all_reduce tag {t}: {exc}"
                    outcomes.append(protocol.OpOutcome(t, "lost", e0=e0, e1=e1, reason=str(exc)))
                else:
                    outcomes.append(protocol.OpOutcome(t, "error", e0=e0, e1=e1, reason=str(exc)))
                    findings.append({"kind": "unexpected_error", "tag": t, "rev": rev, "epoch": e0,
                                     "detail": f"{type(exc).__name__}: {exc}"[:500]})
                continue
            result = self.x[t] if self._inplace(t) else self.out[t]
            assert result is not None
            self._maybe_corrupt(result, info)
            expected = self.wl.expected(patterns[t], rev, t, info.peers)
            mm = self.wl.compare(result, expected)
            if mm is not None:
                findings.append({
                    "kind": "wrong_result", "tag": t, "rev": rev, "epoch": info.epoch, "peers": list(info.peers),
                    "index": mm.index, "got": mm.got, "expected": mm.expected, "bad_elements": mm.bad_elements,
                    "op": op_for_tag(self.spec.op, t),
                })
            if not self._inplace(t):
                self._check_input(findings, t, patterns[t], rev, me, info.epoch, "after a successful out-of-place op")
            outcomes.append(protocol.OpOutcome(t, "ok", info.epoch, tuple(info.peers), array_hash(result),
                                               info.seconds, e0, e1))
            results.append(result)
            members.update(info.peers)
        report = protocol.StepReport(me, rev, t0, time.monotonic(), tuple(outcomes), tuple(findings))
        self.tel.send(report.to_frame())
        if report.complete:
            self._phase("update", rev, comm.epoch, comm.peers)
            update_state(self.arrays["params"], self.arrays["meta"], rev, sorted(members), results)
            self.state.revision = rev + 1
            self.complete_steps += 1
        return lost

    # --------------------------------------------------------------- helpers

    def _check_input(self, findings: list[dict[str, Any]], tag: int, pattern: np.ndarray, rev: int, me: int,
                     epoch: int, when: str) -> None:
        want = self.wl.input_for(pattern, rev, tag, me)
        mm = self.wl.compare(self.x[tag], want)
        if mm is not None:
            findings.append({"kind": "input_changed", "tag": tag, "rev": rev, "epoch": epoch, "when": when,
                             "index": mm.index, "got": mm.got, "expected": mm.expected,
                             "bad_elements": mm.bad_elements, "inplace": self._inplace(tag)})

    def _maybe_corrupt(self, result: np.ndarray, info: Any) -> None:
        if not self.spec.corrupt or self.corrupted or self.complete_steps < _CORRUPT_AFTER_STEPS:
            return
        if info.world_size < 2:
            return
        i = result.size // 2
        result[i] = result[i] + result.dtype.type(1)
        self.corrupted = True
        log.warning("debug switch: corrupted element %d of a result (epoch %d)", i, info.epoch)

    def _phase(self, phase: str, rev: int, epoch: int, members: Any) -> None:
        self.tel.send({"type": "phase", "peer_id": self.peer_id, "phase": phase, "rev": rev, "epoch": epoch,
                       "members": list(members)})



def _is_lost(comm: Any) -> bool:
    """True if the Communicator can no longer be used (expelled, master lost, closed)."""
    return comm.lost is not None or comm.closed
