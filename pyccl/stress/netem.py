"""The network emulator process: every :class:`~pyccl.stress.proxy.FaultProxy` of a run.

The proxies live in their own process (spawned, uvloop) so that forwarding
bytes neither competes with the orchestrator's event loop for the GIL nor
stops when a peer is SIGSTOPped: the proxy is the network, not a peer.

Control protocol (``pyccl.wire`` frames over one TCP connection; the
orchestrator is the only client; each request carries an ``id`` that its
``reply`` echoes):

========  ===================================================  ==========================
request   fields                                               reply fields
========  ===================================================  ==========================
open      ``upstream`` [host, port], ``name``                  ``port`` (the proxy's)
stall     ``port``, ``duration`` (seconds, or nil: forever)    ``count`` (connections)
reset     ``port``, ``all`` (bool)                             ``count``
refuse    ``port``: stop accepting (the peer is gone)          -
close     ``port``: reset everything and forget the proxy      -
stats     -                                                    ``proxies``: {port: [down, up, active, accepted]}
========  ===================================================  ==========================

An unknown port answers ``error``. When the control connection closes the
process closes every proxy and exits; it also dies with its parent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import random
import signal
import sys
from collections.abc import Callable
from typing import Any

from pyccl import wire
from pyccl.stress.protocol import FrameReader
from pyccl.stress.proxy import FaultProxy, LinkShape

__all__ = ["NetemClient", "host_main"]

log = logging.getLogger("pyccl.stress.netem")


def host_main(shape: LinkShape, seed: int, port_pipe: Any, log_path: str | None) -> None:
    """Process entry point: serve the control protocol until the client leaves."""
    from pyccl.stress.worker import _die_with_parent, _redirect_output

    _die_with_parent()
    if log_path:
        _redirect_output(log_path)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s netem %(levelname)s %(name)s: %(message)s")
    runner: Callable[..., Any]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    runner(_serve(shape, seed, port_pipe))
    os._exit(0)


async def _serve(shape: LinkShape, seed: int, port_pipe: Any) -> None:
    proxies: dict[int, FaultProxy] = {}
    rng = random.Random(seed)
    done = asyncio.Event()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def handle(frame: dict[str, Any]) -> dict[str, Any]:
            t = frame["type"]
            if t == "open":
                up = frame.get("upstream")
                if not (isinstance(up, list) and len(up) == 2 and isinstance(up[0], str) and wire.is_int(up[1], 1, 65535)):
                    return {"type": "error", "reason": "open needs upstream [host, port]"}
                fresh = FaultProxy((up[0], up[1]), shape, name=str(frame.get("name", ""))[:64])
                port = await fresh.start()
                proxies[port] = fresh
                return {"type": "reply", "port": port}
            if t == "stats":
                return {"type": "reply", "proxies": {
                    port: [q.stats.down, q.stats.up, q.stats.active, q.stats.accepted] for port, q in proxies.items()
                }}
            which = frame.get("port")
            p = proxies.get(which) if isinstance(which, int) else None
            if p is None or not isinstance(which, int):
                return {"type": "error", "reason": f"no proxy on port {wire.clip(which)}"}
            if t == "stall":
                d = frame.get("duration")
                return {"type": "reply", "count": p.stall(float(d) if isinstance(d, (int, float)) else None)}
            if t == "reset":
                return {"type": "reply", "count": p.reset(rng, all_connections=bool(frame.get("all")))}
            if t == "refuse":
                p.stop_accepting()
                return {"type": "reply"}
            if t == "close":
                del proxies[which]
                await p.close()
                return {"type": "reply"}
            return {"type": "error", "reason": f"unknown request {wire.clip(t)}"}

        pending: list[dict[str, Any]] = []
        fr = FrameReader(pending.append)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                fr.feed(data)
                while pending:
                    frame = pending.pop(0)
                    reply = await handle(frame)
                    reply["id"] = frame.get("id", 0)
                    writer.write(wire.encode(reply))
        except (wire.FrameError, ConnectionError) as exc:
            log.error("control connection failed: %s", exc)
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port_pipe.send(server.sockets[0].getsockname()[1])
    port_pipe.close()
    await done.wait()
    server.close()
    for p in list(proxies.values()):
        await p.close()


class NetemClient:
    """The orchestrator's handle on the emulator process (async; one loop).

    ``await start()`` spawns the process and connects; :meth:`request` sends
    one request and returns its reply (raises ``RuntimeError`` on ``error``);
    ``await close()`` ends the process (SIGKILL after a grace period).
    """

    def __init__(self, shape: LinkShape, seed: int = 0, log_path: str | None = None) -> None:
        self.shape = shape
        self.seed = seed
        self.log_path = log_path
        self._proc: Any = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._read_task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 60.0) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=host_main, args=(self.shape, self.seed, child, self.log_path),
                                 name="pyccl-stress-netem", daemon=True)
        self._proc.start()
        child.close()
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(None, parent.poll, timeout)
        if not ready:
            raise RuntimeError("the network emulator process did not start")
        port = parent.recv()
        parent.close()
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        self._read_task = asyncio.ensure_future(self._read_loop())

    async def _read_loop(self) -> None:
        assert self._reader is not None
        frames: list[dict[str, Any]] = []
        fr = FrameReader(frames.append)
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                fr.feed(data)
                for f in frames:
                    fut = self._waiters.pop(int(f.get("id", 0)), None)
                    if fut is not None and not fut.done():
                        fut.set_result(f)
                frames.clear()
        finally:
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(RuntimeError("the network emulator process went away"))
            self._waiters.clear()

    async def request(self, frame: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        if self._writer is None:
            raise RuntimeError("the network emulator is not running")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        self._writer.write(wire.encode({**frame, "id": rid}))
        reply = await asyncio.wait_for(fut, timeout)
        if reply["type"] == "error":
            raise RuntimeError(f"network emulator: {reply.get('reason')}")
        return reply

    async def open(self, upstream_port: int, name: str = "") -> int:
        """A new proxy in front of 127.0.0.1:upstream_port; returns its port."""
        return int((await self.request({"type": "open", "upstream": ["127.0.0.1", upstream_port], "name": name}))["port"])

    async def stall(self, port: int, duration: float | None) -> int:
        return int((await self.request({"type": "stall", "port": port, "duration": duration}))["count"])

    async def reset(self, port: int, all_connections: bool = False) -> int:
        return int((await self.request({"type": "reset", "port": port, "all": all_connections}))["count"])

    async def refuse(self, port: int) -> None:
        await self.request({"type": "refuse", "port": port})

    async def close_proxy(self, port: int) -> None:
        await self.request({"type": "close", "port": port})

    async def stats(self) -> dict[int, list[int]]:
        return {int(k): v for k, v in (await self.request({"type": "stats"}))["proxies"].items()}

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._read_task is not None:
            await asyncio.gather(self._read_task, return_exceptions=True)
        if self._proc is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._proc.join, 10.0)
            if self._proc.exitcode is None:
                try:
                    os.kill(self._proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await loop.run_in_executor(None, self._proc.join, 10.0)
            self._proc = None
