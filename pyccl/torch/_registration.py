"""Registration of the ``pyccl`` backend with torch.distributed.

``import pyccl.torch`` calls :func:`register`, which registers
:func:`create_process_group` under the name ``pyccl`` (extended API, so the
creator learns the group's name and global ranks).
"""

from __future__ import annotations

import atexit
from typing import Any

import torch.distributed as dist

from pyccl.torch._runtime import BACKEND_NAME, RUNTIME, Options
from pyccl.torch.process_group import ProcessGroupPyccl


def create_process_group(dist_opts: Any, backend_options: Any = None) -> ProcessGroupPyccl:
    """The creator registered with torch (extended API)."""
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
            pg.abort()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
