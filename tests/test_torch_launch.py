"""The examples run under torchrun (env:// rendezvous) on backend "pyccl",
with the in-process master and with an external one (PYCCL_MASTER)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from conftest import pyccl_pythonpath
from mp_helpers import running_master
from torch_mp import free_port

ROOT = Path(__file__).resolve().parent.parent


def _torchrun(script: str, nproc: int, *args: str, env: dict[str, str] | None = None, timeout: float = 90) -> str:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = pyccl_pythonpath()
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "examples" / script), *args]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.mark.timeout(120)
def test_ddp_example_under_torchrun_with_external_master() -> None:
    with running_master() as master:
        out = _torchrun("ddp_train.py", 2, "--steps", "5", env={"PYCCL_MASTER": master.address})
    assert "pyccl: 5 steps" in out and "parameters identical on all 2 ranks: True" in out, out


@pytest.mark.timeout(120)
def test_fsdp_example_under_torchrun() -> None:
    out = _torchrun("fsdp_train.py", 2, "--steps", "3")
    assert "pyccl FSDP2: 3 steps on 2 ranks" in out, out
