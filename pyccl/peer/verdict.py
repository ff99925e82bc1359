"""Waiting for an op's verdict: the caller's side of "one outcome per op".

After its data plane finished, a peer reports ``done`` (or ``failed``) and
waits until :meth:`~pyccl.peer.state.PeerState.verdict_known`: the master's
``op_ok`` commits the op; a drain of its epoch (once the next epoch is
known) or the loss of the group fails it. :class:`PeerState` decides, as
before; this module only says where the caller sleeps.

On a plain TCP master connection the core reads the socket
(``_core.ControlChannel``): the caller sends ``done`` and sleeps in C++ with
the GIL released, and the ``op_ok`` for its op wakes it directly, without a
Python thread in between (the caller may even be the thread that reads it).
It then records the op_ok in PeerState (:meth:`~PeerState.on_op_ok`, so a
failover's ``resume`` lists it as committed) and asks PeerState for the
verdict. Between taking the key and recording it, the key is the channel's
"unrecorded" one, and a resume built in that window reports it committed
too: a peer never commits an op it told a new master was undecided.
Everything else still reaches PeerState through the control thread; after
each such frame the thread bumps the channel's generation, which sends every
caller sleeping in C++ back here to look at the new state (no wake-up can be
lost: the caller reads the generation under the Communicator's lock, in the
same critical section where it finds the verdict unknown). With no live
channel (TLS, or between two master connections) the caller sleeps on the
Communicator's condition variable, which every state change notifies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pyccl import _core
from pyccl import protocol as P
from pyccl.errors import CCLError
from pyccl.peer import state as S
from pyccl.peer.control import ControlClient

__all__ = ["report_and_wait"]


def report_and_wait(cv: threading.Condition, state: S.PeerState, control: Callable[[], ControlClient],
                    op: S.OpTicket, result: S.LocalResult, message: str, what: str) -> None:
    """Report this peer's part of ``op`` and wait for the verdict: return if
    the op was committed, raise its error otherwise. ``control`` gives the
    current master connection (it changes on failover); ``cv`` guards
    ``state``."""
    key = (op.epoch.number, op.tag, op.seq)
    with cv:
        frame = state.report(op, result, message)
        # A frame of an earlier master connection is never sent (failover: the
        # new master learns of the op from the resume instead).
        client = control() if frame is not None and op.session == state.session else None
    pending: _core.ControlChannel | None = None  # sends `done` with the first wait on it
    if client is not None:
        assert frame is not None
        if isinstance(frame, P.Done) and client.channel is not None:
            pending = client.channel
        else:
            try:
                client.send(frame)
            except CCLError:
                pass  # the lost-connection path wakes the waiter
    while True:
        with cv:
            if state.verdict_known(op):
                state.verdict(op, result, message, what)
                return
            channel = control().channel
            if channel is None or channel.ended:
                cv.wait()  # TLS (the Python reader applies op_ok), or between master connections
                continue
            generation = channel.generation
        if channel is pending:
            outcome = channel.done_and_wait(*key, generation)
        else:
            outcome = channel.wait(*key, generation)
        pending = None
        if outcome == _core.WaitResult.DECIDED:
            with cv:
                state.on_op_ok(P.OpOk(*key))  # now verdict_known: committed
                # Until here a failover's resume learnt of this commit from the
                # channel (unrecorded keys); from here on, from PeerState.
                channel.recorded(*key)
                state.verdict(op, result, message, what)
            return
