"""Every benchmark runs as a user runs it: its smallest configuration, from a
directory outside the repository, importing the pyccl these tests import (the
installed package in CI). A benchmark that puts the source tree on sys.path
would shadow the installed package there and fail in its child processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import pyccl_pythonpath

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

CASES = {
    "auth_latency": ["--reps", "1"],
    "failover_recovery": ["--kills", "1", "--size", "1024"],
    "allreduce": ["--world-sizes", "2", "--sizes", "4", "64KiB", "--connections", "1", "--reps", "1"],
    "quantized": ["--world-size", "2", "--size", "1MiB", "--reps", "1"],
    "latency_split": ["--world-sizes", "2", "--reps", "20"],
    "profile_allreduce": ["--world-size", "2", "--size", "1MiB", "--seconds", "0.5"],
    "shared_state": ["--sizes", "1MiB", "--holders", "1", "--reps", "1"],
    "wan_connections": ["--size", "1MiB", "--connections", "1", "--delay", "5ms", "--reps", "1", "--no-reference"],
    "torch_backend": ["--quick"],
    "linkemu": ["--connections", "2", "--plain-bytes", "64MiB", "--plain-connections", "1", "--seconds", "0.2",
                "--reps", "1"],
    "geo": ["--configs", "6x2", "--sizes", "1MiB", "--reps", "1"],
    "master_scale": ["--peers", "20", "--reps", "3", "--admissions", "1", "--floor", "--groups", "--quiet-peers", "5",
                     "--storm-peers", "20", "--storms", "1", "--calm", "0.3"],
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_from_any_directory(name: str, tmp_path: Path) -> None:
    if name == "torch_backend":
        pytest.importorskip("torch")
    out = tmp_path / "results"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": pyccl_pythonpath()}
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *CASES[name], "--out", str(out / name)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert any(out.iterdir()), f"{name} wrote no result into {out}"
