"""Run N peer processes that each report one result over their own pipe.

One pipe per peer, never a shared queue: a peer killed while writing to a
shared queue would wedge it for everyone. Every child is joined (or killed)
before this returns, whatever happens.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from typing import Any

CTX = mp.get_context("spawn")


def _child(target: Callable[..., None], args: tuple[Any, ...], pipe: Any) -> None:
    """Run the peer body; a crash is reported as {"crash": traceback} so the
    test shows it instead of waiting for a message that never comes."""
    try:
        target(*args, pipe)
    except BaseException:
        pipe.send({"crash": traceback.format_exc()})


def run_pipe_peers(target: Callable[..., None], n: int, *args: Any, timeout: float = 100.0) -> list[Any]:
    """Start ``target(*args, pipe)`` n times; return each peer's one message, in start order.

    A peer that raises sends ``{"crash": traceback}`` instead; see ``check_no_crash``.
    """
    pipes, procs = [], []
    try:
        for _ in range(n):
            r, w = CTX.Pipe(duplex=False)
            p = CTX.Process(target=_child, args=(target, args, w))
            p.start()
            w.close()
            pipes.append(r)
            procs.append(p)
        out = []
        for i, r in enumerate(pipes):
            if not r.poll(timeout):
                raise AssertionError(f"peer {i} sent nothing within {timeout} s")
            out.append(r.recv())
        return out
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def check_no_crash(results: list[Any]) -> None:
    for i, r in enumerate(results):
        assert not (isinstance(r, dict) and "crash" in r), f"peer {i} crashed:\n{r['crash']}"
