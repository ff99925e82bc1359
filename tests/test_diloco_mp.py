"""DiLoCo across peer processes on loopback (torch CPU, tiny models).

* exactness: two peers, every mode, the global parameters after every outer
  step are bit-identical to a single-process reference of the algorithm
  (sync, one-step-delayed, streaming fragments, delayed + fragments);
* churn: three peers, one SIGKILLed mid-run and a new one joining; every
  outer step leaves every peer with the same state hash, and the joiner
  starts from the group's exact state.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import pyccl
from diloco_helpers import H, Peers, exact_peer, reference

MODES = [(False, 1), (True, 1), (False, 2), (True, 2)]
STEPS = 6 * H


@pytest.mark.timeout(120)
def test_every_mode_matches_the_single_process_reference_bit_for_bit():
    with pyccl.Master(host="127.0.0.1", port=0) as master, Peers() as peers:
        for r in (0, 1):
            peers.start(f"p{r}", exact_peer, master.address, r, MODES, STEPS)
        for group, (delayed, fragments) in enumerate(MODES):
            want = reference(delayed, fragments, STEPS)
            got: dict[str, list] = {"p0": [], "p1": []}
            for name in got:
                while True:
                    msg = peers.recv(name, 60)
                    if msg[0] == "done":
                        assert msg[1] == group
                        break
                    _, g, outer_step, fragment, inner_step, world, arrays = msg
                    assert g == group and world == 2
                    assert inner_step % H == fragment * H // fragments, "fragment synced at the wrong inner step"
                    got[name].append(arrays)
            label = f"delayed={delayed} fragments={fragments}"
            assert len(got["p0"]) == len(want) == STEPS // H * fragments, label
            for k, (a, b, ref) in enumerate(zip(got["p0"], got["p1"], want)):
                for x, y, z in zip(a, b, ref):
                    assert x.tobytes() == y.tobytes(), f"{label}: peers differ after outer step {k + 1}"
                    assert x.tobytes() == z.tobytes(), (
                        f"{label}: outer step {k + 1} differs from the reference (max diff "
                        f"{np.max(np.abs(x.astype(np.float64) - z)):.3g})"
                    )
            if delayed:
                # The first outer step of each fragment has nothing to apply yet.
                assert all(np.array_equal(x, y) for x, y in zip(got["p0"][0], want[0]))
