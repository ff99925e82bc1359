"""The compiled link emulator behind ``pyccl stress`` (and a geography on it).

:class:`CompiledNetem` has the asynchronous interface of
:class:`~pyccl.stress.netem.NetemClient` (``open``, ``stall``, ``reset``,
``refuse``, ``close_proxy``, ``stats``) over a :class:`LinkEmulator`
process. Without a geography every link gets the same shape (the
``--net-*`` options); with one (``--geography FILE``), peer ``i`` lives in
region ``geography.region_of(i)`` at loopback address ``peer_ip(i)`` and
every new peer's links to and from the peers already there are shaped as
the geography says (:class:`~pyccl.stress.geography.Geography`).
"""

from __future__ import annotations

from pyccl.stress.geography import Geography, peer_ip
from pyccl.stress.linkemu import EmulatorError, LinkEmulator, LinkParams

__all__ = ["CompiledNetem"]


class CompiledNetem:
    """``pyccl stress``'s network: one ``pyccl-linkemu`` process, one proxy per peer."""

    def __init__(self, default: LinkParams, seed: int = 0, log_path: str | None = None,
                 geography: Geography | None = None, threads: int = 2) -> None:
        self.default_params = default
        self.seed = seed
        self.log_path = log_path
        self.geography = geography
        self.threads = threads
        self.emu: LinkEmulator | None = None
        self._peers: list[tuple[str, str, str]] = []  # (name, region, ip) of every peer opened

    async def start(self, timeout: float = 60.0) -> None:
        self.emu = LinkEmulator(self.threads, self.seed, self.log_path)
        self.emu.default(self.geography.default if self.geography else self.default_params)

    def _e(self) -> LinkEmulator:
        if self.emu is None:
            raise EmulatorError("the link emulator is not running")
        return self.emu

    def placement(self, index: int) -> tuple[str | None, str | None]:
        """(data host, region) of peer ``index``: its own address and region with a geography."""
        if self.geography is None:
            return None, None
        return peer_ip(index), self.geography.region_of(index)

    async def open(self, upstream_port: int, name: str = "", index: int | None = None) -> int:
        """A proxy in front of a peer's data port; with a geography, ``index`` places the peer."""
        emu = self._e()
        name = name or f"p{upstream_port}"
        host, region = self.placement(index) if index is not None else (None, None)
        port = emu.open(upstream_port, name, upstream_host=host or "127.0.0.1")
        if self.geography is not None and host is not None and region is not None:
            geo = self.geography
            emu.source(host, name)
            up = geo.region(region).uplink
            if up:
                emu.uplink(name, up)
            for other, other_region, _ in self._peers:
                there, shared = geo.link(region, other_region)
                emu.link(name, other, there, shared)
                back, shared_back = geo.link(other_region, region)
                emu.link(other, name, back, shared_back)
            self._peers.append((name, region, host))
        return port

    async def stall(self, port: int, duration: float | None) -> int:
        return self._e().stall(port, duration)

    async def reset(self, port: int, all_connections: bool = False) -> int:
        return self._e().reset(port, all_connections)

    async def refuse(self, port: int) -> None:
        self._e().refuse(port)

    async def close_proxy(self, port: int) -> None:
        self._e().close_proxy(port)

    async def stats(self) -> dict[int, list[int]]:
        return self._e().stats()

    async def close(self) -> None:
        if self.emu is not None:
            self.emu.close()
            self.emu = None
