"""Test-side helpers for the torch backend tests: free ports, launching ranks."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from mp_helpers import PeerProcs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(pp: PeerProcs, world: int, body: Callable[..., Any], *args: Any) -> None:
    for r in range(world):
        pp.start(r, body, world, *args)
