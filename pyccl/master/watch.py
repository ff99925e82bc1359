"""The master's probe loop (I/O around :class:`pyccl.master.standby.Watcher`).

A master with an address to watch (a standby's ``--standby-of``, or the
master that replaced it after it stepped down) sends that address a
``probe`` every heartbeat interval and hands the answer, or its absence, to
the pure :class:`~pyccl.master.standby.Watcher`, which says when to take
over or to step down.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Protocol

from pyccl import protocol as P
from pyccl.auth import new_nonce
from pyccl.master.standby import Decision, Watcher, make_probe
from pyccl.master.state import Action, MasterState
from pyccl.wire import FrameError, decode_body, decode_length, encode

__all__ = ["watch_loop", "probe"]

log = logging.getLogger("pyccl.master")


class _Applies(Protocol):
    loop: asyncio.AbstractEventLoop

    def now(self) -> float: ...
    def apply(self, actions: list[Action]) -> None: ...
    def rearm(self) -> None: ...


def _tls_client() -> ssl.SSLContext:
    # A master serving TLS is probed over TLS. The certificate is not checked:
    # a probe proves itself with the run secret, and its answer only delays
    # or allows a takeover (docs/architecture.md, "Master failover").
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def probe(address: str, frame: P.Probe, timeout: float, tls: bool = False) -> P.Standing:
    """Send ``frame`` to the master at ``address``; its answer, or an exception."""
    host, _, port = address.rpartition(":")

    async def exchange() -> P.Standing:
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port),
                                                       ssl=_tls_client() if tls else None)
        try:
            writer.write(encode(frame.to_wire()))
            n = decode_length(await reader.readexactly(4))
            answer = P.parse_master_frame(decode_body(await reader.readexactly(n)))
        finally:
            writer.close()
        if not isinstance(answer, P.Standing):
            raise FrameError(f"expected 'standing', got {answer.TYPE!r}")
        return answer

    return await asyncio.wait_for(exchange(), timeout)


async def watch_loop(core: _Applies, state: MasterState, secret: bytes | None, own_address: str,
                     tls: bool = False) -> None:
    """Probe ``state.watch_address`` every heartbeat interval; take over or step down as the Watcher says."""
    watcher: Watcher | None = None
    watched: str | None = None
    while True:
        await asyncio.sleep(state.heartbeat_interval)
        target = state.watch_address
        if target is None:
            continue
        if target != watched:
            watcher, watched = Watcher(state.heartbeat_timeout), target
        assert watcher is not None
        active = state.passive is None
        frame = make_probe(secret, state.term, active, own_address, new_nonce(), watcher.silence(core.now()))
        try:
            answer = await probe(target, frame, max(0.05, state.heartbeat_timeout / 2), tls)
            decision = watcher.on_answer(core.now(), answer, state.term, active)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, FrameError, ValueError,
                ssl.SSLError) as exc:
            log.debug("probe of the master at %s failed: %s", target, exc)
            decision = watcher.on_silence(core.now(), active)
        if decision is Decision.ACTIVATE:
            log.warning("the master at %s answered no probe for %g s: taking over", target, state.heartbeat_timeout)
            state.activate(watcher.takeover_term(state.term), core.now())
            core.rearm()
        elif decision is Decision.STEP_DOWN:
            out: list[Action] = []
            state.step_down(f"the master at {target} is active with a higher term", out, watch=target)
            core.apply(out)
