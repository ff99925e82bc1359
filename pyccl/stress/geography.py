"""An emulated geography: regions, the links inside and between them (pure).

Used by ``pyccl stress --geography FILE``, ``benchmarks/geo.py`` and the
tests, which run every peer on this machine behind the compiled link
emulator (:mod:`pyccl.stress.linkemu`). Peer ``i`` gets its own loopback
address (:func:`peer_ip`) and sends from it, so the emulator knows which
peer a connection comes from; the region of peer ``i`` is
``placement[i]``, or the regions in turn (peers "joined in alternating
order").

A geography file is JSON::

    {
      "regions": {
        "eu": {"delay": "1ms", "rate": "200MB/s", "uplink": "100MB/s"},
        "us": {"delay": "1ms", "rate": "200MB/s"}
      },
      "between": [
        {"regions": ["eu", "us"], "delay": "40ms", "window": "512KiB",
         "rate": "40MB/s", "shared": true}
      ],
      "placement": ["eu", "us", "eu", "us"]
    }

Inside a region every ordered pair of peers gets the region's one-way
``delay``, ``rate`` (per pair, shared by its connections) and ``window``
(bytes in flight per connection and direction); ``uplink`` caps each of the
region's peers over all its outgoing links. ``between`` entries apply in
both directions; with ``shared`` the rate is one pipe per direction for
every pair of peers across the two regions (a region's WAN link), else per
pair. Pairs of regions not listed get the ``default`` entry (same fields),
else no shaping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyccl.stress.config import parse_bandwidth, parse_duration, parse_size
from pyccl.stress.linkemu import LinkEmulator, LinkParams

__all__ = ["Geography", "RegionSpec", "PairSpec", "peer_ip", "GeographyError"]


class GeographyError(ValueError):
    """A geography file or mapping that cannot be used (the message says which field)."""


def peer_ip(index: int) -> str:
    """The loopback address of peer ``index`` (127.1.x.y; up to 64k peers)."""
    if not 0 <= index < 250 * 250:
        raise GeographyError(f"peer index {index} is out of range")
    return f"127.1.{index // 250}.{index % 250 + 1}"


@dataclass(frozen=True)
class RegionSpec:
    name: str
    inside: LinkParams
    uplink: float | None = None


@dataclass(frozen=True)
class PairSpec:
    a: str
    b: str
    link: LinkParams
    shared: bool = False


def _params(m: Mapping[str, Any], where: str) -> LinkParams:
    try:
        delay = parse_duration(str(m["delay"])) if m.get("delay") is not None else 0.0
        rate = parse_bandwidth(str(m["rate"])) if m.get("rate") is not None else None
        window = parse_size(str(m["window"])) if m.get("window") is not None else None
    except ValueError as exc:
        raise GeographyError(f"{where}: {exc}") from exc
    return LinkParams(delay, rate, window)


@dataclass(frozen=True)
class Geography:
    regions: tuple[RegionSpec, ...]
    pairs: tuple[PairSpec, ...] = ()
    default: LinkParams = LinkParams()
    placement: tuple[str, ...] | None = None

    # ------------------------------------------------------------- building

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> Geography:
        regs = m.get("regions")
        if not isinstance(regs, Mapping) or not regs:
            raise GeographyError("'regions' must map region names to their settings")
        regions = []
        for name, spec in regs.items():
            if not isinstance(spec, Mapping) or not str(name).isidentifier() and not str(name).replace("-", "").isalnum():
                raise GeographyError(f"region {name!r} needs a settings map and a plain name")
            try:
                up = parse_bandwidth(str(spec["uplink"])) if spec.get("uplink") is not None else None
            except ValueError as exc:
                raise GeographyError(f"region {name}: {exc}") from exc
            regions.append(RegionSpec(str(name), _params(spec, f"region {name}"), up))
        names = {r.name for r in regions}
        pairs = []
        for i, e in enumerate(m.get("between") or []):
            ends = e.get("regions") if isinstance(e, Mapping) else None
            if not (isinstance(ends, list) and len(ends) == 2 and set(ends) <= names and ends[0] != ends[1]):
                raise GeographyError(f"between[{i}]: 'regions' must name two different regions of {sorted(names)}")
            pairs.append(PairSpec(ends[0], ends[1], _params(e, f"between[{i}]"), bool(e.get("shared", False))))
        placement = m.get("placement")
        if placement is not None and not (isinstance(placement, list) and set(placement) <= names):
            raise GeographyError(f"'placement' must list region names of {sorted(names)}")
        default = _params(m["default"], "default") if isinstance(m.get("default"), Mapping) else LinkParams()
        return cls(tuple(regions), tuple(pairs), default, tuple(placement) if placement else None)

    @classmethod
    def load(cls, path: str) -> Geography:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise GeographyError(f"cannot read the geography {path}: {exc}") from exc
        if not isinstance(data, Mapping):
            raise GeographyError(f"{path} must hold a map")
        return cls.from_mapping(data)

    # --------------------------------------------------------------- queries

    def region_of(self, index: int) -> str:
        if self.placement is not None and index < len(self.placement):
            return self.placement[index]
        return self.regions[index % len(self.regions)].name

    def region(self, name: str) -> RegionSpec:
        return next(r for r in self.regions if r.name == name)

    def link(self, ra: str, rb: str) -> tuple[LinkParams, str]:
        """Parameters of a link from region ``ra`` to ``rb`` and its shared-rate name ('' if none)."""
        if ra == rb:
            return self.region(ra).inside, ""
        for p in self.pairs:
            if {p.a, p.b} == {ra, rb}:
                return p.link, f"{ra}>{rb}" if p.shared else ""
        return self.default, ""

    def ring_link_capacity(self, regions: Sequence[str], connections: int) -> list[float]:
        """Bytes/s each link of a ring through peers of these regions (in ring
        order) can carry at once: rates, shared pipes split among the ring's
        links through them, windows (connections x window / delay), uplinks."""
        n = len(regions)
        edges = [(regions[i], regions[(i + 1) % n]) for i in range(n)]
        users: dict[str, int] = {}
        for ra, rb in edges:
            shared = self.link(ra, rb)[1]
            if shared:
                users[shared] = users.get(shared, 0) + 1
        caps = []
        for ra, rb in edges:
            params, shared = self.link(ra, rb)
            cap = float("inf")
            if params.rate:
                cap = params.rate / (users[shared] if shared else 1)
            if params.window and params.delay > 0:
                cap = min(cap, connections * params.window / params.delay)
            up = self.region(ra).uplink
            if up:
                cap = min(cap, up)
            caps.append(cap)
        return caps

    def link_capacity(self, ra: str, rb: str, connections: int, flows: int = 1) -> float:
        """Bytes/s of one ring link from region ``ra`` to ``rb`` when ``flows``
        ring links share the pipe between them (if it is shared)."""
        params, shared = self.link(ra, rb)
        cap = float("inf")
        if params.rate:
            cap = params.rate / (flows if shared else 1)
        if params.window and params.delay > 0:
            cap = min(cap, connections * params.window / params.delay)
        up = self.region(ra).uplink
        return min(cap, up) if up else cap

    def two_level_time(self, regions: Sequence[str], per_region: int, nbytes: float, connections: int) -> float:
        """Lower bound on a two-level all-reduce's time: region reduce-scatter,
        then the per-shard all-reduces across ``regions`` (in cross-ring order;
        the ``per_region`` shard rings share each pipe), then the region
        all-gather, each at its slowest link's capacity."""
        m, r = per_region, len(regions)
        inside = min(self.link_capacity(g, g, connections) for g in regions)
        across = min(self.link_capacity(regions[i], regions[(i + 1) % r], connections, flows=m) for i in range(r))
        return 2 * (m - 1) / m * nbytes / inside + 2 * (r - 1) / r * (nbytes / m) / across

    # ------------------------------------------------------------ emulator

    def apply(self, emu: LinkEmulator, peers: Sequence[tuple[str, str, str]]) -> None:
        """Configure ``emu`` for ``peers`` given as (name, region, source ip)."""
        emu.default(self.default)
        for name, region, ip in peers:
            emu.source(ip, name)
            up = self.region(region).uplink
            if up:
                emu.uplink(name, up)
        for src, ra, _ in peers:
            for dst, rb, _ in peers:
                if src != dst:
                    params, shared = self.link(ra, rb)
                    emu.link(src, dst, params, shared)
