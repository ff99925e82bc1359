"""Configuration of a ``pyccl stress`` run: the typed settings and the parsers
for the human-friendly values the command line takes.

Every parser raises ``ValueError`` with a message that names the accepted
forms; :func:`argparse_type` turns one into an argparse ``type=`` so that a
bad value is reported as a usage error, never as a traceback.

Accepted forms:

* sizes: ``16MiB``, ``256KiB``, ``1GB``, ``4096`` (bytes; binary and decimal
  prefixes, case-insensitive, optional ``B``);
* durations: ``60s``, ``50ms``, ``2m``, ``1h``, ``1.5`` (seconds);
* rates: ``0.2/s``, ``12/min``, ``0.2`` (events per second);
* bandwidths: ``100MiB/s``, ``1GB/s``, ``800Mbit/s``, ``800Mbps``;
* duration ranges: ``2s`` (fixed), ``1s..5s`` (uniform), ``forever``.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

__all__ = [
    "DTYPES",
    "OPS",
    "NetConfig",
    "StressConfig",
    "DurationRange",
    "parse_size",
    "parse_duration",
    "parse_rate",
    "parse_bandwidth",
    "parse_duration_range",
    "argparse_type",
]

# Element types the stress workload can verify exactly (numpy has no bfloat16).
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name) for name in ("float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64")
}
# Reductions whose exact result the verifier can compute; "mixed" cycles them over tags.
OPS = ("sum", "max", "min", "mixed")

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10, "ki": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20, "mi": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "gi": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40, "ti": 1 << 40,
}
_TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUM = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def parse_size(text: str) -> int:
    """Bytes from ``16MiB``/``256KiB``/``1GB``/``4096``; must be >= 0 and whole."""
    m = re.fullmatch(_NUM + r"\s*([a-zA-Z]*)", text.strip())
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size; use e.g. 16MiB, 256KiB, 1GB or a byte count")
    value = float(m.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def parse_duration(text: str) -> float:
    """Seconds from ``60s``/``50ms``/``2m``/``1h``/``1.5``; must be finite and >= 0."""
    m = re.fullmatch(_NUM + r"\s*([a-zA-Z]*)", text.strip())
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _TIME_UNITS:
        raise ValueError(f"{text!r} is not a duration; use e.g. 60s, 50ms, 2m, 1h or seconds")
    value = float(m.group(1)) * _TIME_UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"duration {text!r} is not finite")
    return value


def parse_rate(text: str) -> float:
    """Events per second from ``0.2/s``, ``12/min``, ``3/h`` or a bare number."""
    m = re.fullmatch(_NUM + r"\s*(?:/\s*([a-zA-Z]+))?", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a rate; use e.g. 0.2/s, 12/min or a number per second")
    per = (m.group(2) or "s").lower()
    if per not in _TIME_UNITS or per == "":
        raise ValueError(f"{text!r}: unknown time unit {per!r}; use /s, /min or /h")
    value = float(m.group(1)) / _TIME_UNITS[per]
    if not math.isfinite(value):
        raise ValueError(f"rate {text!r} is not finite")
    return value


def parse_bandwidth(text: str) -> float:
    """Bytes per second from ``100MiB/s``, ``1GB/s``, ``800Mbit/s`` or ``800Mbps``."""
    m = re.fullmatch(_NUM + r"\s*(?:([kmgtKMGT])(i?))?(bit|bps|b|B)?(?:/s)?", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a bandwidth; use e.g. 100MiB/s, 1GB/s, 800Mbit/s")
    number, prefix, binary, unit = float(m.group(1)), (m.group(2) or "").lower(), m.group(3), m.group(4) or "B"
    power = " kmgt".index(prefix or " ")
    scale = (1024 if binary else 1000) ** power
    bits = unit in ("bit", "bps", "b")
    value = float(number * scale / (8 if bits else 1))
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"bandwidth {text!r} must be a positive number")
    return value


@dataclass(frozen=True)
class DurationRange:
    """How long a fault lasts: uniform in ``[low, high]`` seconds, or forever.

    ``forever`` means until something else ends it (a stalled connection
    that one side closes, a hung process the run ends).
    """

    low: float
    high: float
    forever: bool = False

    def draw(self, u: float) -> float | None:
        """The duration for a uniform draw ``u`` in [0, 1); ``None`` for forever."""
        if self.forever:
            return None
        return self.low + (self.high - self.low) * u

    def __str__(self) -> str:
        if self.forever:
            return "forever"
        return f"{self.low:g}s" if self.low == self.high else f"{self.low:g}s..{self.high:g}s"


def parse_duration_range(text: str) -> DurationRange:
    """``2s`` (fixed), ``1s..5s`` (uniform) or ``forever``."""
    t = text.strip().lower()
    if t in ("forever", "inf", "infinite"):
        return DurationRange(math.inf, math.inf, forever=True)
    lo_text, sep, hi_text = t.partition("..")
    lo = parse_duration(lo_text)
    hi = parse_duration(hi_text) if sep else lo
    if hi < lo:
        raise ValueError(f"duration range {text!r} ends before it starts")
    return DurationRange(lo, hi)


T = TypeVar("T")


def argparse_type(parser: Callable[[str], T]) -> Callable[[str], T]:
    """Wrap a parser so argparse reports its ValueError as a usage error."""

    def parse(text: str) -> T:
        try:
            return parser(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    parse.__name__ = parser.__name__.replace("parse_", "")
    return parse


@dataclass(frozen=True)
class NetConfig:
    """Network emulation on every peer-to-peer link (the proxy in front of each peer).

    Attributes:
        delay: one-way delay in seconds, applied in both directions.
        window: bytes in flight per connection and direction (None: no limit);
            with ``delay`` this bounds a connection to ``window / delay`` B/s.
        bandwidth: bytes per second per link and direction, shared by the
            link's connections (None: no cap).
        stall_rate: silent stalls per second (whole run); each stalls every
            open connection into one peer.
        stall_duration: how long a stall lasts.
        reset_rate: connection resets per second (TCP RST to both ends).
        force_proxy: put the proxy in place even with no emulation set.
        emulator: ``"compiled"`` (``pyccl-linkemu``, the default) or
            ``"python"`` (the asyncio proxy, about 0.6 GB/s).
        geography: a geography file (regions, links inside and between
            them; see :mod:`pyccl.stress.geography`): needs the compiled
            emulator, and replaces delay/window/bandwidth.
    """

    delay: float = 0.0
    window: int | None = None
    bandwidth: float | None = None
    stall_rate: float = 0.0
    stall_duration: DurationRange = DurationRange(1.0, 1.0)
    reset_rate: float = 0.0
    force_proxy: bool = False
    emulator: str = "compiled"
    geography: str | None = None

    @property
    def enabled(self) -> bool:
        """True when links go through the proxy."""
        return bool(
            self.force_proxy or self.delay > 0 or self.window or self.bandwidth or self.stall_rate > 0
            or self.reset_rate > 0 or self.geography
        )


@dataclass(frozen=True)
class StressConfig:
    """Everything one run needs; built by :func:`pyccl.stress.cli.config_from_args`.

    Invariants (checked by :meth:`validate`): ``peers >= 2``,
    ``max_peers >= peers``, ``size`` a positive multiple of the element size,
    rates >= 0, ``1 <= concurrency <= 64``.
    """

    peers: int = 4
    duration: float = 60.0
    size: int = 16 << 20
    dtype: str = "float32"
    op: str = "sum"
    connections: int = 4
    concurrency: int = 4
    kill_rate: float = 0.1
    hang_rate: float = 0.02
    join_rate: float = 0.1
    intruder_rate: float = 0.0  # intruder attempts per second (pyccl.stress.intruders)
    master_kill_rate: float = 0.0  # SIGKILLs of the master per second (restarted, pyccl.stress.master_faults)
    master_restart_delay: DurationRange | None = None  # None: 0..heartbeat_timeout
    hang_duration: DurationRange | None = None  # None: 0.4..2.5 x heartbeat_timeout
    hang_kill_fraction: float = 0.3
    seed: int = 0
    heartbeat_timeout: float = 5.0
    stuck_slack: float = 5.0
    sync_timeout: float | None = None  # None: max(5 s, 2 x heartbeat_timeout), the core's fetch timeout
    max_peers: int = 0  # 0: 2 x peers
    min_alive: int = 2
    state_size: int = 64 << 10
    pace: float = 0.0
    optimize_every: int = 0  # > 0: optimize_topology() at every N-th revision
    warmup_timeout: float = 120.0
    cooldown: float | None = None  # None: heartbeat_timeout + stuck_slack, at most a third of the run
    net: NetConfig = field(default_factory=NetConfig)
    report: str | None = None
    plot: str | None = None
    quiet: bool = False
    live: bool | None = None  # None: when stdout is a terminal
    workdir: str | None = None
    keep_logs: bool = False
    corrupt_peer: int | None = None  # debug: spawn index of a peer that corrupts one result

    @property
    def element_count(self) -> int:
        return self.size // DTYPES[self.dtype].itemsize

    @property
    def peer_cap(self) -> int:
        return self.max_peers or 2 * self.peers

    @property
    def stuck_threshold(self) -> float:
        """Seconds a peer may spend in one phase (counted from the later of
        entering it and the last injected fault) before it is a violation."""
        return self.heartbeat_timeout + self.stuck_slack

    @property
    def sync_threshold(self) -> float:
        """The stuck limit for ``sync`` (and ``connect``) plus slack: a fetcher
        notices a hung holder only by its socket timeout, ``max(5 s, 2 x
        heartbeat_timeout)`` in today's core, so that bounds a sync
        (``--sync-timeout`` overrides it, e.g. to hold a fixed core to the
        heartbeat timeout)."""
        base = self.sync_timeout if self.sync_timeout is not None else max(5.0, 2 * self.heartbeat_timeout)
        return base + self.stuck_slack

    @property
    def hang_range(self) -> DurationRange:
        if self.hang_duration is not None:
            return self.hang_duration
        return DurationRange(0.4 * self.heartbeat_timeout, 2.5 * self.heartbeat_timeout)

    @property
    def restart_range(self) -> DurationRange:
        if self.master_restart_delay is not None:
            return self.master_restart_delay
        return DurationRange(0.0, self.heartbeat_timeout)

    @property
    def fault_cooldown(self) -> float:
        """No faults start in the last this-many seconds, so the end proves recovery."""
        if self.cooldown is not None:
            return self.cooldown
        return min(self.heartbeat_timeout + self.stuck_slack, self.duration / 3)

    def validate(self) -> StressConfig:
        """Raise ValueError naming the first bad setting; return self."""
        if self.peers < 2:
            raise ValueError(f"--peers must be at least 2, got {self.peers}")
        if self.optimize_every < 0:
            raise ValueError(f"--optimize-every must be >= 0, got {self.optimize_every}")
        if self.peer_cap < self.peers:
            raise ValueError(f"--max-peers ({self.max_peers}) is below --peers ({self.peers})")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.op not in OPS:
            raise ValueError(f"--op {self.op!r} is not one of {', '.join(OPS)}")
        item = DTYPES[self.dtype].itemsize
        if self.size <= 0 or self.size % item:
            raise ValueError(f"--size {self.size} must be a positive multiple of {item} ({self.dtype})")
        if not 1 <= self.connections <= 64:
            raise ValueError(f"--connections must be in [1, 64], got {self.connections}")
        if not 1 <= self.concurrency <= 64:
            raise ValueError(f"--concurrency must be in [1, 64], got {self.concurrency}")
        for name in ("kill_rate", "hang_rate", "join_rate", "intruder_rate", "master_kill_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if self.net.stall_rate < 0 or self.net.reset_rate < 0:
            raise ValueError("--net-stall-rate and --net-reset-rate must be >= 0")
        if self.duration <= 0:
            raise ValueError("--duration must be positive")
        if self.heartbeat_timeout <= 0 or self.stuck_slack < 0:
            raise ValueError("--heartbeat-timeout must be positive and --stuck-slack >= 0")
        if not 0 <= self.hang_kill_fraction <= 1:
            raise ValueError("--hang-kill-fraction must be in [0, 1]")
        if self.state_size < 8 or self.state_size % 8:
            raise ValueError("--state-size must be a positive multiple of 8 bytes")
        if self.min_alive < 2:
            raise ValueError("--min-alive must be at least 2")
        if self.corrupt_peer is not None and self.corrupt_peer < 0:
            raise ValueError("--debug-corrupt-peer takes a peer index >= 0")
        return self
