"""The peer processes of a stress run, as the orchestrator tracks them."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any, Protocol

from pyccl.stress.faults import FaultRecord


class TelemetrySender(Protocol):
    """A peer's telemetry connection, as far as the orchestrator writes to it."""

    def send(self, frame: dict[str, Any]) -> None: ...

__all__ = ["PeerState", "PeerProc", "TelemetrySender"]


class PeerState(str, enum.Enum):
    STARTING = "starting"   # process started, no Communicator admitted yet
    RUNNING = "running"
    STOPPED = "stopped"     # SIGSTOP
    KILLED = "killed"       # by the orchestrator
    EXITED = "exited"       # by itself


@dataclass
class PeerProc:
    """One peer process as the orchestrator sees it."""

    index: int
    process: Any
    data_port: int
    proxy_port: int | None
    started: float
    state: PeerState = PeerState.STARTING
    peer_id: int = 0
    admissions: int = 0
    hung_since_admission: bool = False
    conn: TelemetrySender | None = None
    said_bye: bool = False
    hang: FaultRecord | None = None
    hang_timer: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @property
    def alive(self) -> bool:
        """Running or starting: counts towards the minimum kept alive."""
        return self.state in (PeerState.STARTING, PeerState.RUNNING)
