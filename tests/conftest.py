"""Shared test plumbing."""

from __future__ import annotations

import os
from pathlib import Path

import pyccl


def pyccl_pythonpath() -> str:
    """The PYTHONPATH that makes child processes import the same pyccl as these
    tests: the source tree when developing with PYTHONPATH=., the installed
    package (whose directory holds the compiled core) in CI. Putting the
    repository first unconditionally would shadow an installed package with a
    source tree that has no built core."""
    root = str(Path(pyccl.__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (root, rest) if p)
