"""The master-kill fault of ``pyccl stress`` (``--master-kill-rate``).

The master process is SIGKILLed mid-run and started again on the same
address after a random delay (``--master-restart-delay``), holding new
groups while the members re-register. The peers must carry the run on by
themselves (Guarantee 7): every result exact, state hashes identical,
revisions monotone, nobody stuck. The watchdog's allowance restarts when
the master is back, since every peer legitimately waits for it until then.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, Protocol

from pyccl.stress.faults import FaultKind, FaultRecord
from pyccl.stress.processes import MasterProcess

__all__ = ["MASTER_TARGET", "kill_master"]

log = logging.getLogger("pyccl.stress")

MASTER_TARGET = -1  # the "peer index" of a fault on the master


class _Run(Protocol):
    master: MasterProcess | None
    secret: bytes | None
    workdir: str

    def now(self) -> float: ...
    def background(self, coro: Coroutine[Any, Any, None]) -> None: ...
    def on_master_back(self, rec: FaultRecord) -> None: ...


async def kill_master(run: _Run, heartbeat_timeout: float, delay: float) -> FaultRecord | None:
    """SIGKILL the master now; a task restarts it on its address ``delay`` seconds later."""
    old = run.master
    if old is None or not old.address or not old.alive:
        return None  # not started yet, or already dead and about to be restarted
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, old.kill)
    rec = FaultRecord(FaultKind.MASTER_KILL, run.now(), MASTER_TARGET, f"master {old.address}, back after {delay:.2f} s")
    run.background(_restart(run, old.address, heartbeat_timeout, delay, rec))
    return rec


async def _restart(run: _Run, address: str, heartbeat_timeout: float, delay: float, rec: FaultRecord) -> None:
    await asyncio.sleep(delay)
    port = int(address.rpartition(":")[2])
    master = MasterProcess(heartbeat_timeout, os.path.join(run.workdir, "master.log"), run.secret, port=port,
                           hold=heartbeat_timeout)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, master.wait_ready, 60.0)
    run.master = master
    rec.ended_at = run.now()
    log.info("master restarted on %s at t=%.2f", master.address, rec.ended_at)
    run.on_master_back(rec)
