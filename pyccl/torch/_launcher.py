"""Issuing a process group's ops: numbering, the runner, timeouts, coalescing.

:class:`Launcher` owns what every op of one group passes through: the issue
lock (every rank issues the same sequence, whatever threads torch calls
from), the ops in flight (a barrier waits for them), the runner and
completion threads, the timeout watchdog, and the coalescing window.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyccl.torch._health import GroupHealth
from pyccl.torch._watchdog import Watchdog
from pyccl.torch._work import BackendError, Completer, PendingOp, PycclWork, Runner, seconds


class Launcher:
    """Creates and issues the ops of process group ``name``.

    ``on_timeout(op, seconds)`` runs on the watchdog thread when an op
    outlives its timeout (the group aborts itself there)."""

    def __init__(self, name: str, timeout: float, health: GroupHealth,
                 on_timeout: Callable[[PendingOp, float], None]) -> None:
        self.name = name
        self.timeout = timeout  # the group's; a call may bring its own
        self._health = health
        self.issue_lock = threading.RLock()
        self._lock = threading.Lock()
        self._inflight: dict[int, PendingOp] = {}
        self.coalescing: list[PycclWork] | None = None
        self.completer = Completer(name, health.translate)
        self.runner = Runner(name, self.completer)
        self.watchdog: Watchdog[PendingOp] = Watchdog(name, on_timeout)

    def new_op(self, name: str, result: list[torch.Tensor] | None = None, opts: Any = None) -> PendingOp:
        """A new op; its timeout is the call's (``opts.timeout``, where torch
        sets one) or else the group's."""
        timeout = seconds(getattr(opts, "timeout", None), self.timeout)
        work = PycclWork(f"{name} on process group '{self.name}'", timeout, result, self.runner, self.completer)
        return PendingOp(name, work, self.completer, check=self._health.check_result)

    def in_flight(self, but: PendingOp) -> list[PendingOp]:
        """Every op issued and not yet over, except ``but``."""
        with self._lock:
            return [o for o in self._inflight.values() if o is not but]

    def launch(self, op: PendingOp, body: Callable[[PendingOp], None], sync: bool = False,
               profile: tuple[str, Sequence[torch.Tensor]] | None = None) -> PycclWork:
        """Issue ``op``'s parts under the issue lock; return its Work.

        ``sync``: the caller waits for the result right away (``async_op=False``
        in the dist API). If the op is only core collectives and the runner
        has nothing queued, it runs here on the caller's thread: same order,
        two thread hops less. Nobody holds its Work yet, so completing it here
        runs no user callback.

        ``profile``: (title, input tensors) of the ``pyccl:<title>`` event the
        op records while torch's profiler runs, as gloo's ops do."""
        with self.issue_lock:
            self._health.ensure_usable(op.name)
            if profile is not None and torch.autograd.profiler._is_profiler_enabled:
                _record(op, *profile)
            key = id(op)
            with self._lock:
                self._inflight[key] = op
            self.watchdog.watch(op, op.work.timeout)
            op.then(lambda: self._retire(key, op))
            try:
                with torch.no_grad():  # staging copies of parameters must not build graphs
                    body(op)
            except (ValueError, TypeError) as exc:
                # Bad arguments: nothing (more) was issued; fail the op's work
                # and raise here, as gloo does.
                op.issued(BackendError(f"pyccl: {op.name}: {exc}"))
                raise ValueError(f"pyccl: {op.name}: {exc}") from exc
            except BaseException as exc:
                op.issued(exc)
                raise
            # The runner's part is the op's last one (unless p2p parts are still
            # out), so the runner completes the op itself, without a hop.
            has_calls = bool(op.calls)
            if has_calls and sync and op.only_issue_part() and self.runner.idle():
                op.inline_thread = threading.current_thread()
                op.add_part()
                op.issued()
                op.run_calls()  # completes the op on this thread
            else:
                if has_calls:
                    op.add_part()
                op.issued()
                if has_calls:
                    self.runner.submit(op)
            if self.coalescing is not None:
                self.coalescing.append(op.work)
        return op.work

    def _retire(self, key: int, op: PendingOp) -> None:
        self.watchdog.unwatch(op)
        with self._lock:
            self._inflight.pop(key, None)

    def stop_issuing(self) -> None:
        """Shutdown, first half: the runner's queued ops fail (the comm is
        closed by then) and the watchdog stops."""
        self.runner.stop()
        self.watchdog.stop()

    def stop_completing(self) -> None:
        """Shutdown, second half: the completion thread."""
        self.completer.stop()


# torch's own entry points for a profiler event with argument shapes (what
# gloo records; record_function takes no arguments).
_enter = torch._C._autograd._record_function_with_args_enter
_exit = torch._C._autograd._record_function_with_args_exit


def _record(op: PendingOp, title: str, inputs: Sequence[torch.Tensor]) -> None:
    """A profiler event ``pyccl:<title>`` with the inputs' shapes, from issue to
    completion. torch checks that a collective's event is asynchronous, i.e.
    that it ends on another thread than it began on; an op completed on the
    issuing thread (inline, or by the caller's own wait) ends it on a helper."""
    handle = _enter(f"pyccl:{title}", *inputs)
    issuer = threading.get_ident()

    def end() -> None:
        if threading.get_ident() != issuer:
            _exit(handle)
            return
        t = threading.Thread(target=_exit, args=(handle,),
                             name="pyccl-torch-profile")
        t.start()
        t.join()

    op.then(end)
