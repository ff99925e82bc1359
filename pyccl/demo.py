"""``pyccl demo``: a master and 4 peers all-reducing on this machine through churn.

Every step each peer all-reduces a 16 MiB float32 tensor whose values are a
deterministic function of its peer id, then checks the result element by
element against the exact sum over the peers that took part (known from the
op's ReduceInfo). Part-way through, one peer is killed with SIGKILL and a
new one is started; the survivors see PeerFailure, retry, and the newcomer is
admitted at the next update_topology().
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("pyccl.demo")

# Values stay below 2**24, so float32 sums are exact and the check is strict.
_PATTERN = 1000
_STATE_ELEMS = 1 << 20  # 4 MiB of shared state


def _combined_hash(state: Any) -> int:
    h = 0
    for _name, v in sorted(state.hashes().items()):
        h = (h * 1_000_003) ^ v
    return h & 0xFFFFFFFF


def peer_input(peer_id: int, count: int) -> np.ndarray:
    """The tensor peer ``peer_id`` contributes: peer_id * 1000 + (i mod 1000)."""
    return (np.arange(count, dtype=np.int64) % _PATTERN + peer_id * _PATTERN).astype(np.float32)


def expected_sum(peer_ids: tuple[int, ...], count: int) -> np.ndarray:
    base = (np.arange(count, dtype=np.int64) % _PATTERN) * len(peer_ids)
    return (base + sum(peer_ids) * _PATTERN).astype(np.float32)


def _peer_main(master: str, count: int, connections: int, pace: float, stop: Any, pipe: Any) -> None:
    import pyccl

    logging.basicConfig(level=logging.WARNING)
    out = _Sender(pipe)
    comm = pyccl.Communicator(master, connections=connections)
    comm.connect(timeout=60)
    me = comm.peer_id
    out.put(("admitted", me, os.getpid(), comm.world_size))
    x = peer_input(me, count)
    pristine = x.copy()
    # Shared "model" state: a newcomer starts from zeros and must receive the
    # group's bytes; everyone updates it deterministically from the reduced x.
    state = pyccl.SharedState({"model": np.zeros(_STATE_ELEMS, np.float32)})
    first_sync = True
    epoch, index = -1, 0
    try:
        while not stop.is_set():
            comm.update_topology()
            sync = comm.sync_shared_state(state)
            state_hash = _combined_hash(state)
            if first_sync:
                out.put(("synced", me, sync.rx_bytes, sync.seconds, state_hash, sync.revision))
                first_sync = False
            try:
                info = comm.all_reduce(x)
            except pyccl.PeerFailure as exc:
                intact = bool(np.array_equal(x, pristine))
                out.put(("failure", me, comm.world_size, intact, str(exc)))
                continue
            if info.epoch != epoch:
                epoch, index = info.epoch, 0
            exact = bool(np.array_equal(x, expected_sum(info.peers, count)))
            out.put(("step", me, info.epoch, index, info.world_size, info.seconds, exact, state_hash))
            state["model"] += np.float32(1e-6) * x[:_STATE_ELEMS]
            state.revision += 1
            index += 1
            np.copyto(x, pristine)
            time.sleep(pace)
    except pyccl.CCLError as exc:
        if not stop.is_set():
            out.put(("error", me, str(exc)))
    finally:
        comm.close()


class _Sender:
    """Adapter giving a pipe end the ``put`` of a queue."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def put(self, item: tuple[Any, ...]) -> None:
        try:
            self._pipe.send(item)
        except (BrokenPipeError, OSError):
            pass  # the orchestrator is gone; keep going until told to stop


@dataclass
class _Step:
    world_size: int
    seconds: list[float] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)
    hashes: set[int] = field(default_factory=set)


class _Demo:
    """One demo run: the peer processes, their event pipes, and the tally."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.count = args.size // 4
        self.nbytes = self.count * 4
        self.ctx = mp.get_context("spawn")
        self.stop = self.ctx.Event()
        self.procs: dict[int, Any] = {}  # pid -> spawned process
        # One pipe per peer, never a shared Queue: a SIGKILL that lands while a
        # peer writes to a shared queue would wedge that queue for everyone.
        self.readers: list[mp_connection.Connection] = []
        self.pids: dict[int, int] = {}  # peer id -> pid
        self.steps: dict[tuple[int, int], _Step] = {}
        self.stats = {"steps": 0, "checked": 0, "wrong": 0, "failures": 0, "dirty_inputs": 0, "errors": 0}

    @staticmethod
    def say(msg: str) -> None:
        print(msg, flush=True)  # the demo's report is its output

    def spawn(self, master_address: str) -> None:
        reader, writer = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=_peer_main, args=(master_address, self.count, self.args.connections,
                                                      self.args.pace, self.stop, writer))
        p.start()
        writer.close()
        self.readers.append(reader)
        assert p.pid is not None
        self.procs[p.pid] = p

    def next_events(self, timeout: float) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for r in mp_connection.wait(self.readers, timeout):
            assert isinstance(r, mp_connection.Connection)
            try:
                out.append(r.recv())
            except (EOFError, OSError):
                self.readers.remove(r)  # that peer exited or was killed
        return out

    def handle(self, ev: tuple[Any, ...]) -> None:
        kind, peer = ev[0], ev[1]
        stats = self.stats
        if kind == "admitted":
            self.pids[peer] = ev[2]
            self.say(f"----- peer {peer} admitted (world size {ev[3]} when it got in)")
        elif kind == "failure":
            stats["failures"] += 1
            stats["dirty_inputs"] += 0 if ev[3] else 1
            self.say(f"      peer {peer}: PeerFailure, input {'intact' if ev[3] else 'CHANGED'}; "
                     f"retrying with world size {ev[2]}")
        elif kind == "error":
            stats["errors"] += 1
            self.say(f"      peer {peer}: error: {ev[2]}")
        elif kind == "synced":
            _, _, rx, secs, h, rev = ev
            if rx:
                self.say(f"----- peer {peer} received {rx / 2**20:.1f} MiB of shared state in {secs * 1e3:.0f} ms "
                         f"(revision {rev}, hash {h:08x}), verified by hash")
        elif kind == "step":
            self.on_step(*ev[2:])

    def on_step(self, epoch: int, index: int, ws: int, secs: float, exact: bool, h: int) -> None:
        stats = self.stats
        st = self.steps.setdefault((epoch, index), _Step(ws))
        st.seconds.append(secs)
        st.exact.append(exact)
        st.hashes.add(h)
        stats["checked"] += 1
        stats["wrong"] += 0 if exact else 1
        if len(st.exact) < ws:
            return
        stats["steps"] += 1
        t = max(st.seconds)
        busbw = self.nbytes / t * 2 * (ws - 1) / ws / 1e9 if ws > 1 else 0.0
        verdict = f"{sum(st.exact)}/{ws} peers exact" if all(st.exact) else "MISMATCH"
        if len(st.hashes) == 1:
            verdict += f", state hash {next(iter(st.hashes)):08x} on all"
        else:
            verdict += ", STATE HASHES DIFFER"
            stats["wrong"] += 1
        self.say(f"{stats['steps']:>5} {epoch:>5} {ws:>5} {t * 1e3:>7.1f}ms {busbw:>6.2f} GB/s  {verdict}")
        del self.steps[(epoch, index)]

    def drive(self, master_address: str) -> None:
        """Start the peers; kill one and start a joiner on schedule; report until the end."""
        args = self.args
        t_start = time.monotonic()
        killed = joined = False
        for _ in range(args.peers):
            self.spawn(master_address)
        while time.monotonic() - t_start < args.duration:
            elapsed = time.monotonic() - t_start
            if not killed and elapsed > args.duration * 0.35 and len(self.pids) >= 2:
                victim = sorted(self.pids)[1]
                os.kill(self.pids.pop(victim), signal.SIGKILL)
                self.say(f"----- killed peer {victim} with SIGKILL")
                killed = True
            if killed and not joined and elapsed > args.duration * 0.55:
                self.spawn(master_address)
                self.say("----- started a new peer; it joins at the next update_topology()")
                joined = True
            for ev in self.next_events(0.2):
                self.handle(ev)

    def shut_down(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + 15
        for p in self.procs.values():
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()


def run(args: argparse.Namespace) -> int:
    import pyccl

    demo = _Demo(args)
    with pyccl.Master(host="127.0.0.1", port=0) as master:
        demo.say(f"pyccl demo: master at {master.address}; {args.peers} peers all-reduce {demo.nbytes >> 20} MiB "
                 f"float32 per step over {args.connections} connections each")
        demo.say(f"{'step':>5} {'epoch':>5} {'world':>5} {'time':>9} {'busbw':>10}  "
                 "check (all-reduce result; shared state)")
        try:
            demo.drive(master.address)
        finally:
            demo.shut_down()
    stats = demo.stats
    ok = stats["wrong"] == 0 and stats["dirty_inputs"] == 0 and stats["errors"] == 0 and stats["steps"] > 0
    demo.say(f"done: {stats['steps']} steps, {stats['checked']} results checked, {stats['wrong']} wrong, "
             f"{stats['failures']} PeerFailures retried, {stats['dirty_inputs']} inputs changed by a failed op -> "
             f"{'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--size", type=int, default=16 << 20, help="bytes per all-reduce (default 16 MiB)")
    p.add_argument("--duration", type=float, default=25.0, help="seconds to run")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--pace", type=float, default=0.05, help="seconds each peer sleeps between steps")
