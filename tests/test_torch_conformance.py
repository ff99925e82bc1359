"""torch.distributed backend "pyccl" where torch users meet gloo's behaviour:
zero-element tensors, timeouts, the monitored barrier, the device-type
introspection of torch's state-dict and checkpoint utilities, and sparse
all-reduce (DDP over nn.Embedding(sparse=True)). The bodies are in
tests/torch_conformance_bodies.py; every comparison is against gloo in the
same processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

import torch_conformance_bodies as bodies
from mp_helpers import PeerProcs
from torch_mp import free_port, launch


def _run(world: int, body: object, *args: object, timeout: float = 100) -> dict[int, dict]:
    with PeerProcs() as pp:
        launch(pp, world, body, free_port(), *args)
        got = pp.gather("result", range(world), timeout)
        pp.join(range(world), 30)
    for rank, res in sorted(got.items()):
        assert not res["failures"], f"rank {rank}:\n" + "\n".join(res["failures"])
    return got


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 3])
def test_zero_element_tensors_like_gloo(world: int) -> None:
    _run(world, bodies.empty_body)


@pytest.mark.timeout(150)
def test_ops_raise_after_their_timeout() -> None:
    got = _run(2, bodies.timeout_body)
    took, message = got[0]["barrier"]
    for word in ("pyccl", "barrier", "Timed out", "1 s"):
        assert word in message, message
    assert got[1]["destroy_seconds"] < 15, got[1]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 3])
def test_monitored_barrier_names_missing_ranks(world: int) -> None:
    _run(world, bodies.monitored_body)


@pytest.mark.timeout(200)
def test_fsdp2_state_dict_and_checkpoint_like_gloo(tmp_path: Path) -> None:
    got = _run(2, bodies.state_dict_body, str(tmp_path), timeout=170)
    assert any(k.startswith("async/") for k in got[0]["keys"]), got[0]["keys"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 3])
def test_sparse_all_reduce_and_ddp_sparse_embedding_like_gloo(world: int) -> None:
    _run(world, bodies.sparse_body)


@pytest.mark.timeout(150)
def test_a_run_with_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """PYCCL_SECRET: the backend's master, ring links and side channel all prove membership."""
    monkeypatch.setenv("PYCCL_SECRET", "torch backend test secret")
    _run(2, bodies.secret_body)


@pytest.mark.timeout(150)
def test_profiler_events_like_gloo() -> None:
    _run(2, bodies.profiler_body)
