"""A peer notices a frozen master (SIGSTOP) by its silence and leaves cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyccl
import pytest

from conftest import pyccl_pythonpath


@pytest.mark.timeout(60)
def test_peer_declares_a_frozen_master_lost():
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyccl.cli", "master", "--host", "127.0.0.1", "--port", "0",
         "--heartbeat-timeout", "1"],
        stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(),
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pyccl_pythonpath()},
    )
    try:
        address = None
        deadline = time.monotonic() + 30
        while address is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            m = re.search(r"listening on (\S+:\d+)", line)
            if m:
                address = m.group(1)
        assert address, "the master did not report its address"
        # master_timeout=0: no failover, the group is lost at once (tests/test_failover_mp.py covers failover).
        comm = pyccl.Communicator(address, connections=1, master_timeout=0)
        comm.connect(timeout=20)
        comm.all_reduce(np.ones(4, np.float32))
        time.sleep(1.5)
        assert comm.lost is None  # heartbeats keep a quiet master alive
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        while comm.lost is None and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        waited = time.monotonic() - t0
        assert comm.lost is not None and "sent nothing" in comm.lost, comm.lost
        assert waited < 1.0 + 1.5, waited  # one heartbeat timeout of silence
        with pytest.raises(pyccl.CCLError):
            comm.all_reduce(np.ones(4, np.float32))
        comm.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
