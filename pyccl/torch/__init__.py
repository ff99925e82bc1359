"""torch.distributed backend ``pyccl``.

    import pyccl.torch                      # registers the backend name "pyccl"
    dist.init_process_group("pyccl", ...)   # env:// (torchrun) or tcp://

DDP, FSDP (classic and ``fully_shard``), DTensor and the ``dist.*`` API run
unchanged on it; see README.md ("torch.distributed backend") for what differs
from gloo. Pure Python over the pyccl core: nothing is compiled against torch.

Modules: ``_rendezvous`` (registration, master and peer-group rendezvous,
options), ``process_group`` (the ProcessGroup subclass), ``_work`` (Work,
futures, the completion thread), ``_ops`` (reduce op and dtype mapping),
``_p2p`` (the point-to-point side channel for send/recv and all-to-all).
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
    import torch.distributed as _dist
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("pyccl.torch needs PyTorch (pip install torch)") from exc

if not _dist.is_available():  # pragma: no cover
    raise ImportError("pyccl.torch needs a PyTorch build with torch.distributed")

from pyccl.torch._rendezvous import BACKEND_NAME, Options, register
from pyccl.torch._work import BackendError, PycclWork
from pyccl.torch.process_group import ProcessGroupPyccl

register()

__all__ = ["BACKEND_NAME", "Options", "BackendError", "PycclWork", "ProcessGroupPyccl", "register"]
