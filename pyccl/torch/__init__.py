"""torch.distributed backend ``pyccl``.

    import pyccl.torch                      # registers the backend name "pyccl"
    dist.init_process_group("pyccl", ...)   # env:// (torchrun) or tcp://

DDP, FSDP (classic and ``fully_shard``), DTensor and the ``dist.*`` API run
unchanged on it; see README.md ("torch.distributed backend") for what differs
from gloo. Pure Python over the pyccl core: nothing is compiled against torch.

Modules: ``process_group`` (the ProcessGroup subclass: entry points),
``_lowering`` (torch calls into core collectives and side-channel
transfers), ``_work`` (Work, futures, the runner and completion threads),
``_health`` (whether a group is whole; its errors), ``_watchdog``
(timeouts), ``_rendezvous`` (forming a group, the closing handshake),
``_runtime`` (options, process-wide state), ``_registration`` (the backend
name), ``_ops`` (reduce op and dtype mapping), ``_p2p`` (the point-to-point
side channel), ``_monitored_barrier``.
"""

from __future__ import annotations

try:
    import torch.distributed as _dist

    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("pyccl.torch needs PyTorch (pip install torch)") from exc

if not _dist.is_available():  # pragma: no cover
    raise ImportError("pyccl.torch needs a PyTorch build with torch.distributed")

from pyccl.torch._registration import register
from pyccl.torch._runtime import BACKEND_NAME, Options
from pyccl.torch._work import BackendError, PycclWork
from pyccl.torch.process_group import ProcessGroupPyccl

register()

__all__ = ["BACKEND_NAME", "Options", "BackendError", "PycclWork", "ProcessGroupPyccl", "register"]
