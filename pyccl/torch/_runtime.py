"""Process-wide state of the pyccl torch backend: its options, the state
shared by the process groups of one process (the default group's master
and store, the point-to-point hub), and torch-store helpers.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from dataclasses import dataclass
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
        master: ``host:port`` of an external ``pyccl master`` (``PYCCL_MASTER``), or a
            list ``host1:port1,host2:port2`` of a master and its standbys.
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

    def resolved(self) -> Options:
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
        self.groups: weakref.WeakSet[Any] = weakref.WeakSet()

    def ensure_hub(self, host: str) -> Any:
        from pyccl.auth import resolve_secret
        from pyccl.torch._p2p import Hub

        with self.lock:
            if self.hub is None:
                # A run with a secret (PYCCL_SECRET) proves group membership on the side channel too.
                self.hub = Hub(host, authenticate=resolve_secret(None) is not None)
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
    while isinstance(store, dist.distributed_c10d.PrefixStore) and seen < 16:
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
    """The local address this machine uses to reach ``address`` (host:port; of a
    list of masters, the first)."""
    host, _, port = address.split(",")[0].strip().rpartition(":")
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, int(port)))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def store_get_str(store: Any, key: str, timeout: float) -> str:
    """``store.get`` bounded by ``timeout`` (the store's own timeout may be long)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.wait([key], timedelta(seconds=max(0.05, min(5.0, deadline - time.monotonic()))))
            value: bytes = store.get(key)
            return value.decode()
        except (RuntimeError, dist.DistStoreError) as exc:  # timeout of one slice
            if time.monotonic() >= deadline:
                raise RuntimeError(f"pyccl: key {key!r} did not appear in the torch store within {timeout:.0f} s") from exc


def random_base() -> int:
    """A random base for the peer-group numbers of a run that shares an external master."""
    return (secrets.randbits(20) + 1) << 10
