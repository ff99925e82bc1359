"""The live terminal view of a stress run.

On a terminal, a two-line status block is redrawn in place (ANSI: cursor up,
clear line) about twice a second; messages (violations, notable events) are
printed above it and scroll. On a pipe, a plain status line is printed every
``plain_every`` seconds instead. ``--quiet`` turns the status off entirely;
messages are still printed (CI logs want the violations).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

__all__ = ["Snapshot", "LiveView", "render"]


@dataclass(frozen=True)
class Snapshot:
    """What the status line shows."""

    elapsed: float
    duration: float
    world_size: int
    alive: int
    stopped: int
    ops: int
    gbps: float
    faults: int
    survived: int
    faults_by_kind: dict[str, int]
    violations: int
    phase: str = "running"


def render(s: Snapshot) -> list[str]:
    """The status block as plain text lines."""
    kinds = " ".join(f"{k}:{n}" for k, n in s.faults_by_kind.items() if n)
    flag = "OK" if s.violations == 0 else "VIOLATIONS"
    return [
        f"[{s.phase}] {s.elapsed:6.1f}/{s.duration:.0f}s  world {s.world_size}  peers alive {s.alive}"
        f"{f' stopped {s.stopped}' if s.stopped else ''}  ops {s.ops}  {s.gbps:6.3f} GB/s",
        f"faults {s.faults} injected / {s.survived} survived ({kinds or 'none yet'})  "
        f"violations {s.violations} {flag}",
    ]


class LiveView:
    """Draws :class:`Snapshot` s and messages on ``stream``.

    ``mode``: ``"tty"`` (redraw in place), ``"plain"`` (periodic lines) or
    ``"off"`` (messages only).
    """

    def __init__(self, mode: str, stream: TextIO | None = None, plain_every: float = 10.0) -> None:
        if mode not in ("tty", "plain", "off"):
            raise ValueError(f"unknown live view mode {mode!r}")
        self.mode = mode
        self.stream = stream or sys.stdout
        self.plain_every = plain_every
        self._drawn = 0
        self._last_plain = -1e9
        self._last: Snapshot | None = None

    def update(self, s: Snapshot) -> None:
        self._last = s
        if self.mode == "tty":
            self._erase()
            lines = render(s)
            self.stream.write("\n".join(lines) + "\n")
            self._drawn = len(lines)
            self.stream.flush()
        elif self.mode == "plain" and s.elapsed - self._last_plain >= self.plain_every:
            self._last_plain = s.elapsed
            self.stream.write("  ".join(render(s)) + "\n")
            self.stream.flush()

    def message(self, line: str) -> None:
        """Print ``line`` above the status block."""
        if self.mode == "tty":
            self._erase()
        self.stream.write(line + "\n")
        if self.mode == "tty" and self._last is not None:
            lines = render(self._last)
            self.stream.write("\n".join(lines) + "\n")
            self._drawn = len(lines)
        self.stream.flush()

    def close(self) -> None:
        """Leave the last status block on screen and stop drawing."""
        self._drawn = 0
        self.stream.flush()

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write("\x1b[1A\x1b[2K" * self._drawn)
            self._drawn = 0
