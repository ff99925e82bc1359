"""Registration and rendezvous of the ``pyccl`` torch.distributed backend.

``import pyccl.torch`` calls :func:`register`, which registers the creator
:func:`create_process_group` under the name ``pyccl`` (extended API, so the
creator learns the group's name and global ranks).

Rendezvous of a process group (every member runs it from its creator):

1. **Master.** ``PYCCL_MASTER=host:port`` (or ``Options.master``) names an
   external ``pyccl master``. Otherwise the default group's rank 0 starts a
   :class:`pyccl.Master` in its own process and publishes its address in the
   torch store (``pyccl/master``); the other ranks read it from there.
   Subgroups (``new_group``, DeviceMesh dimensions) reuse the default group's
   master. A pyccl subgroup of a non-pyccl default group starts its own.
2. **Peer group.** Every torch process group is its own pyccl peer group, so
   groups never see each other's ops. The number comes from a counter in the
   default group's store (``pyccl/peer_groups``), drawn by the group's rank 0
   and published in the group's store: every member agrees on it and no two
   groups of a run share one.
3. **Communicator.** Each member connects with ``order=group rank`` (so its
   ring position is its torch rank) and calls ``update_topology()`` until the
   group has all its members.
4. **Point-to-point.** The process's side-channel hub (see ``_p2p``) publishes
   its address under ``pyccl/p2p/<rank>`` in the group's store.

Shutdown: members close their Communicator and count themselves in the
store (``pyccl/closed``); the rank that started the master waits (bounded)
for the live members before it stops the master, so nobody loses the master
while still closing.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

import torch.distributed as dist

log = logging.getLogger("pyccl.torch")

BACKEND_NAME = "pyccl"


@dataclass
class Options:
    """Options of the pyccl backend: pass as ``init_process_group(..., pg_options=...)``.

    Every field can also be set through an environment variable, which the
    explicit value overrides.

    Attributes:
        master: ``host:port`` of an external ``pyccl master`` (``PYCCL_MASTER``).
            Default: the default group's rank 0 starts one in-process.
        heartbeat_timeout: seconds without a frame before the master declares a
            peer dead, i.e. how long a hung (SIGSTOPped) rank takes to fail the
            others' collectives (``PYCCL_HEARTBEAT_TIMEOUT``, default 5). Only
            used where this process starts the master.
        connections: TCP connections per ring neighbour (``PYCCL_CONNECTIONS``,
            default 4).
        host: address this machine is reached at by the others; the in-process
            master binds to it (``PYCCL_HOST``; default: the torch store's host,
            127.0.0.1 when that is a loopback address).
        connect_timeout: seconds to form a group (default: the process group
            timeout).
    """

    master: str | None = None
    heartbeat_timeout: float | None = None
    connections: int | None = None
    host: str | None = None
    connect_timeout: float | None = None

    def resolved(self) -> "Options":
        env = os.environ
        master = self.master or env.get("PYCCL_MASTER") or None
        hb = self.heartbeat_timeout if self.heartbeat_timeout is not None else float(env.get("PYCCL_HEARTBEAT_TIMEOUT", "5"))
        conns = self.connections if self.connections is not None else int(env.get("PYCCL_CONNECTIONS", "4"))
        host = self.host or env.get("PYCCL_HOST") or None
        return Options(master, hb, conns, host, self.connect_timeout)


class _Runtime:
    """Process-wide state shared by the pyccl process groups of this process."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.default_master: str | None = None  # address used by the default pyccl group
        self.default_store: Any = None  # that group's store: counters live there
        self.default_prefix = "pyccl"  # key prefix of that group's incarnation
        self.default_pg_base = 0  # peer-group numbers of the run start here
        self.hub: Any = None
        self.groups: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def ensure_hub(self, host: str) -> Any:
        from pyccl.torch._p2p import Hub

        with self.lock:
            if self.hub is None:
                self.hub = Hub(host)
            return self.hub

    def release_hub(self) -> None:
        with self.lock:
            hub = self.hub
            if hub is not None and hub.endpoint_count() == 0:
                self.hub = None
            else:
                hub = None
        if hub is not None:
            hub.close()


RUNTIME = _Runtime()


# ------------------------------------------------------------------ helpers


def _underlying_store(store: Any) -> Any:
    seen = 0
    while isinstance(store, dist.PrefixStore) and seen < 16:
        store = store.underlying_store
        seen += 1
    return store


def store_host(store: Any) -> str | None:
    base = _underlying_store(store)
    host = getattr(base, "host", None)
    return host if isinstance(host, str) and host else None


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def master_bind(options: Options, store: Any) -> tuple[str, str]:
    """(bind host, advertised host) of an in-process master."""
    if options.host:
        return options.host, options.host
    host = store_host(store) or "127.0.0.1"
    if _is_loopback(host):
        return "127.0.0.1", "127.0.0.1"
    return "0.0.0.0", host


def local_ip_towards(address: str) -> str:
    """The local address this machine uses to reach ``address`` (host:port)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, int(port)))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def store_get_str(store: Any, key: str, timeout: float) -> str:
    """``store.get`` bounded by ``timeout`` (the store's own timeout may be long)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.wait([key], timedelta(seconds=max(0.05, min(5.0, deadline - time.monotonic()))))
            return store.get(key).decode()
        except (RuntimeError, dist.DistStoreError) as exc:  # timeout of one slice
            if time.monotonic() >= deadline:
                raise RuntimeError(f"pyccl: key {key!r} did not appear in the torch store within {timeout:.0f} s") from exc


# ---------------------------------------------------------------- creation


def create_process_group(dist_opts: Any, backend_options: Any = None) -> Any:
    """The creator registered with torch (extended API)."""
    from pyccl.torch.process_group import ProcessGroupPyccl

    if backend_options is not None and not isinstance(backend_options, Options):
        raise TypeError(f"pyccl: pg_options must be a pyccl.torch.Options, got {type(backend_options).__name__}")
    options = (backend_options or Options()).resolved()
    global_ranks = list(getattr(dist_opts, "global_ranks_in_group", []) or [])
    return ProcessGroupPyccl(
        store=dist_opts.store,
        rank=dist_opts.group_rank,
        size=dist_opts.group_size,
        timeout=dist_opts.timeout,
        group_name=str(dist_opts.group_id),
        global_ranks=global_ranks,
        options=options,
    )


_registered = False


def register() -> None:
    """Register the backend name ``pyccl`` with torch.distributed (idempotent)."""
    global _registered
    if _registered or BACKEND_NAME in dist.Backend.backend_list:
        _registered = True
        return
    # "cuda" is claimed too so that a CUDA tensor reaches pyccl and gets a clear
    # error (this core has no CUDA path) instead of torch's "no backend for
    # device type cuda". It does not change the default backend of any device.
    dist.Backend.register_backend(BACKEND_NAME, create_process_group, extended_api=True, devices=["cpu", "cuda"])
    _registered = True
    atexit.register(_close_all_at_exit)


def _close_all_at_exit() -> None:
    for pg in list(RUNTIME.groups):
        try:
            pg._close(handshake=False)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def option_names() -> list[str]:
    return [f.name for f in fields(Options)]


def random_base() -> int:
    return (secrets.randbits(20) + 1) << 10
