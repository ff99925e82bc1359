"""Rendezvous of a pyccl torch process group, and its closing handshake.

Every member runs :func:`rendezvous` from the group's constructor:

1. **Master.** ``PYCCL_MASTER=host:port`` (or ``Options.master``) names an
   external ``pyccl master``. Otherwise the default group's rank 0 starts a
   :class:`pyccl.Master` in its own process and publishes its address in the
   torch store; the other ranks read it from there. Subgroups (``new_group``,
   DeviceMesh dimensions) reuse the default group's master. A pyccl subgroup
   of a non-pyccl default group starts its own.
2. **Peer group.** Every torch process group is its own pyccl peer group, so
   groups never see each other's ops. The number comes from a counter in the
   default group's store (``peer_groups``), drawn by the group's rank 0 and
   published in the group's store: every member agrees on it and no two
   groups of a run share one.
3. **Point-to-point.** The process's side-channel hub (see ``_p2p``)
   publishes its address under ``p2p/<rank>``; the endpoint is registered
   before the ring forms, since a peer in the ring may send at once.
4. **Communicator.** Each member connects with ``order=group rank`` (so its
   ring position is its torch rank) and waits until the group has all its
   members (:meth:`~pyccl.peer.Communicator.wait_for_world`).

Keys live under ``pyccl/<incarnation>/``: every rank counts its own
incarnations on the store, so a destroy + re-init on the same store never
reads stale keys.

Shutdown: each member closes its Communicator and sets ``closed/<rank>``;
the rank that started the master waits (bounded, in one ``store.wait``) for
the keys of the live members before it stops the master, so nobody loses
the master while still closing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pyccl
from pyccl.errors import Timeout
from pyccl.peer import Communicator
from pyccl.torch import _p2p
from pyccl.torch._runtime import (
    RUNTIME,
    Options,
    local_ip_towards,
    master_bind,
    random_base,
    store_get_str,
)
from pyccl.torch._work import BackendError

log = logging.getLogger("pyccl.torch")

CLOSE_WAIT_S = 10.0


@dataclass
class Formed:
    """What a member holds after the rendezvous."""

    comm: Communicator
    endpoint: _p2p.Endpoint
    master: Any  # the pyccl.Master this rank started, or None
    master_address: str
    master_host: int | None  # global rank whose process runs the master (None: external)
    owns_master_group: bool  # this group's rank 0 started its master
    peer_group: int
    prefix: str  # store key prefix of this incarnation


def rendezvous(store: Any, rank: int, size: int, timeout: float, group_name: str, global_ranks: list[int],
               options: Options, is_default: bool, health: Callable[[], str | None],
               on_started: Callable[[Any, _p2p.Endpoint | None, Communicator | None], None]) -> Formed:
    """Form the group (see the module docstring). ``on_started`` hears of every
    resource as soon as it exists (master, endpoint, communicator), so a
    failure half-way can release what was already started."""
    incarnation = int(store.add(f"pyccl/incarnation/{rank}", 1))
    prefix = f"pyccl/{incarnation}/"
    limit = options.connect_timeout or min(timeout, 600.0)
    deadline = time.monotonic() + limit

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    with RUNTIME.lock:
        shared_master = RUNTIME.default_master if not is_default else None
        shared_store = RUNTIME.default_store if not is_default else None
        shared_prefix = RUNTIME.default_prefix
        base = RUNTIME.default_pg_base
    owns_master_group = not options.master and not shared_master
    master_host = None if options.master else (0 if shared_master else global_ranks[0])
    master = None
    if rank == 0:
        if options.master:
            address = options.master
        elif shared_master:
            address = shared_master
        else:
            bind, advertise = master_bind(options, store)
            master = pyccl.Master(host=bind, port=0, heartbeat_timeout=options.heartbeat_timeout or 5.0).start()
            on_started(master, None, None)
            address = f"{advertise}:{master.port}"
        if is_default or not shared_master:
            base = random_base() if options.master else 0
            pgid = base
        else:
            assert shared_store is not None  # a shared master comes with the default group's store
            pgid = base + int(shared_store.add(f"{shared_prefix}/peer_groups", 1))
        store.set(prefix + "master", address)
        store.set(prefix + "peer_group", str(pgid))
        store.set(prefix + "base", str(base))
    address = store_get_str(store, prefix + "master", left())
    pgid = int(store_get_str(store, prefix + "peer_group", left()))
    if is_default:
        base = int(store_get_str(store, prefix + "base", left()))
        with RUNTIME.lock:
            RUNTIME.default_master = address
            RUNTIME.default_store = store
            RUNTIME.default_prefix = prefix[:-1]
            RUNTIME.default_pg_base = base

    hub = RUNTIME.ensure_hub(local_ip_towards(address))
    store.set(prefix + f"p2p/{rank}", hub.address)
    endpoint = _p2p.Endpoint(hub, group_name, rank, lambda r: store_get_str(store, prefix + f"p2p/{r}", 60.0), health)
    hub.register(endpoint)
    on_started(None, endpoint, None)

    # A master inside a rank's process cannot come back when that rank dies:
    # no failover then (the group is lost at once, as torch expects); an
    # external master (PYCCL_MASTER, a list with standbys) can be restarted.
    comm = Communicator(address, peer_group=pgid, connections=options.connections or 4,
                        name=f"torch:{group_name}:{rank}", order=rank,
                        master_timeout=None if options.master else 0.0)
    endpoint.credential = lambda: comm.membership_key
    comm.on_membership_change(hub.credentials_changed)
    on_started(None, None, comm)
    comm.connect(timeout=left())
    try:
        comm.wait_for_world(size, left())
    except Timeout as exc:
        raise BackendError(f"pyccl: process group '{group_name}' did not form within {limit:.0f} s: "
                           f"{comm.world_size} of {size} ranks joined") from exc
    if comm.world_size != size or comm.rank != rank:
        raise BackendError(f"pyccl: process group '{group_name}' formed wrongly: world size {comm.world_size} "
                           f"(expected {size}), ring rank {comm.rank} (expected {rank})")
    log.info("pyccl: process group '%s' rank %d of %d ready (peer group %d, master %s)",
             group_name, rank, size, pgid, address)
    return Formed(comm, endpoint, master, address, master_host, owns_master_group, pgid, prefix)


def closing_handshake(store: Any, prefix: str, rank: int, live_ranks: list[int], waits: bool, name: str) -> None:
    """Count this rank as closed; if ``waits`` (it runs the master), wait up to
    CLOSE_WAIT_S for every live rank to have done so."""
    try:
        store.set(prefix + f"closed/{rank}", "1")
        if not waits:
            return
        store.wait([prefix + f"closed/{r}" for r in live_ranks], timedelta(seconds=CLOSE_WAIT_S))
    except Exception:
        log.warning("pyccl: not every rank of '%s' shut down within %g s; stopping the master anyway",
                    name, CLOSE_WAIT_S, exc_info=log.isEnabledFor(logging.DEBUG))
