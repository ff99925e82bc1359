"""DDP, FSDP2 and classic FSDP train unchanged on backend="pyccl".

Each rank runs the same training script twice in one process: with
``backend="gloo"`` and with ``backend="pyccl"`` (init_process_group, train
6 steps, destroy_process_group). Losses must equal gloo's bit for bit and the
final parameters must be bit-identical to gloo's and across ranks.

Bit equality with gloo holds wherever every reduction has two operands (2
ranks, and HSDP 2x2); in a flat group of 4, gloo's ring and pyccl's ring add
the four gradients in a different order, so there the results must be
identical across ranks and within float32 rounding of gloo's.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")

import torch_workers
from mp_helpers import PeerProcs
from torch_mp import free_port, launch

TWO_RANK_JOBS = [
    ("ddp", "default"),
    ("ddp", "static_graph"),
    ("ddp", "find_unused"),
    ("ddp", "comm_hook"),
    ("fsdp2", "flat"),
    ("fsdp1", "FULL_SHARD"),
    ("fsdp1", "SHARD_GRAD_OP"),
    ("fsdp1", "NO_SHARD"),
]
FOUR_RANK_JOBS = [("fsdp2", "hsdp"), ("ddp", "default"), ("fsdp2", "flat")]


def _run(world: int, jobs: list[tuple[str, str]]) -> dict[tuple[str, str], dict[int, dict]]:
    ports = {f"{t}-{v}-{b}": free_port() for t, v in jobs for b in ("gloo", "pyccl")}
    out: dict[tuple[str, str], dict[int, dict]] = {}
    with PeerProcs() as pp:
        launch(pp, world, torch_workers.training_body, ports, jobs)
        for _ in jobs:
            got = pp.gather("result", range(world), 120)
            for rank, (trainer, variant, res) in got.items():
                out.setdefault((trainer, variant), {})[rank] = res
        pp.join(range(world), 30)
    return out


def _bit_equal_to_gloo(job: tuple[str, str], per_rank: dict[int, dict]) -> None:
    for rank, res in per_rank.items():
        g, p = res["gloo"], res["pyccl"]
        assert len(p["losses"]) >= 5
        assert p["losses"] == g["losses"], f"{job} rank {rank}: losses differ from gloo's: {p['losses']} vs {g['losses']}"
        assert p["params"] == g["params"], f"{job} rank {rank}: final parameters differ from gloo's"
    digests = {str(sorted(res["pyccl"]["params"].items())) for res in per_rank.values()}
    assert len(digests) == 1, f"{job}: final parameters differ across ranks"


@pytest.mark.timeout(150)
def test_two_ranks_bit_equal_to_gloo() -> None:
    results = _run(2, TWO_RANK_JOBS)
    assert set(results) == set(TWO_RANK_JOBS)
    for job, per_rank in results.items():
        _bit_equal_to_gloo(job, per_rank)


@pytest.mark.timeout(150)
def test_four_ranks() -> None:
    results = _run(4, FOUR_RANK_JOBS)
    # HSDP 2x2: every reduction is 2-way -> bit-equal to gloo.
    _bit_equal_to_gloo(("fsdp2", "hsdp"), results[("fsdp2", "hsdp")])
    for job in (("ddp", "default"), ("fsdp2", "flat")):
        per_rank = results[job]
        digests = {str(sorted(res["pyccl"]["params"].items())) for res in per_rank.values()}
        assert len(digests) == 1, f"{job}: final parameters differ across ranks"
        for rank, res in per_rank.items():
            for a, b in zip(res["pyccl"]["losses"], res["gloo"]["losses"]):
                assert math.isclose(a, b, rel_tol=1e-5), f"{job} rank {rank}: loss {a} vs gloo {b}"
