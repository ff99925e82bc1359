"""Work objects, the per-op bookkeeping and the completion thread.

One torch-level call (``allreduce``, ``allgather``, ``send``, ...) becomes one
:class:`PendingOp`: a count of outstanding parts (core collectives, p2p
transfers, earlier ops a barrier waits for), the tensors that must stay alive
until the op is over, and a ``finish`` step (copies out of staging buffers).
When the last part is over, the op goes to its process group's
:class:`Completer`, a dedicated thread that runs ``finish`` and completes the
torch future, so future callbacks (DDP's reducer, comm hooks, FSDP) run on
that thread and never on a core I/O thread (TORCH_NOTES pitfall 8).

Failures: ``Future.set_exception`` is visible to Python only; a C++ caller
(the DDP reducer) would see a completed future without tensors and crash. So
:meth:`PyccWork.get_future` hands out ``fut.then(lambda f: f.value())``: when
the base future fails, the callback raises, which marks the child future
failed in C++ too, and ``backward()`` raises a ``RuntimeError`` with the
cause (pitfall 2).
"""

from __future__ import annotations

import logging
import queue
import threading
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger("pyccl.torch")


class BackendError(RuntimeError):
    """Every error of the pyccl torch backend (messages start with ``pyccl:``)."""


def _forward_value(fut: torch.futures.Future) -> Any:
    return fut.value()


class PycclWork(dist.Work):
    """The Work handed to torch. Only ``wait`` and ``get_future`` are reachable
    from C++ (pitfall 5); the rest serves Python callers."""

    def __init__(self, name: str, timeout: float, result: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self._name = name
        self._timeout = timeout
        self._result = result if result is not None else []
        self._event = threading.Event()
        self._error: BaseException | None = None
        self._source_rank_value = -1
        self._fut: torch.futures.Future = torch.futures.Future()
        self._user_fut: torch.futures.Future = self._fut.then(_forward_value)

    # ------------------------------------------------------- completion side

    def _complete(self, error: BaseException | None = None) -> None:
        """Called on the completion thread only."""
        if self._event.is_set():
            return
        self._error = error
        self._event.set()
        if error is None:
            self._fut.set_result(self._result)
        else:
            self._fut.set_exception(error)

    # ------------------------------------------------------------ torch API

    def wait(self, timeout: timedelta | float | None = None) -> bool:
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else (timeout or 0.0)
        if seconds <= 0:
            seconds = self._timeout
        if not self._event.wait(seconds):
            raise BackendError(f"pyccl: {self._name} did not complete within {seconds:.1f} s")
        if self._error is not None:
            raise BackendError(str(self._error)) from self._error
        return True

    def get_future(self) -> torch.futures.Future:
        return self._user_fut

    def is_completed(self) -> bool:
        return self._event.is_set()

    def is_success(self) -> bool:
        if not self._event.is_set():
            raise BackendError(f"pyccl: {self._name} has not completed yet")
        return self._error is None

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> list[torch.Tensor]:
        self.wait()
        return self._result

    def source_rank(self) -> int:
        return self._source_rank_value

    def _source_rank(self) -> int:
        return self._source_rank_value

    def synchronize(self) -> None:
        pass

    def block_current_stream(self) -> None:
        self.wait()

    def __repr__(self) -> str:
        state = "pending" if not self._event.is_set() else ("failed" if self._error else "done")
        return f"PycclWork({self._name}, {state})"


class CompletedWork(PycclWork):
    """A work that is over before it is handed out (e.g. an op on a world of one)."""

    def __init__(self, name: str, result: list[torch.Tensor] | None = None) -> None:
        super().__init__(name, 1.0, result)
        self._complete(None)


class PendingOp:
    """Book-keeping of one torch-level op until its Work completes.

    The op starts with one outstanding part, the *issue* part, which the
    issuer releases with :meth:`issued` after it has added every real part;
    so an op can never complete while it is still being issued.
    """

    __slots__ = ("name", "work", "keep", "finish", "_pending", "_error", "_lock", "_completer",
                 "_listeners", "_done", "check")

    def __init__(
        self,
        name: str,
        work: PycclWork,
        completer: "Completer",
        keep: list[Any] | None = None,
        finish: Callable[[], None] | None = None,
        check: Callable[[Any], BaseException | None] | None = None,
    ) -> None:
        self.name = name
        self.work = work
        self.keep = keep if keep is not None else []
        self.finish = finish
        self.check = check  # result of a core op -> error (membership changed) or None
        self._pending = 1
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._completer = completer
        self._listeners: list[Callable[[], None]] = []
        self._done = False

    def add_part(self) -> None:
        with self._lock:
            self._pending += 1

    def part_done(self, error: BaseException | None = None) -> None:
        """Any thread: one part is over (with an error, or not)."""
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._pending -= 1
            ready = self._pending == 0
        if ready:
            self._completer.submit(self)

    def issued(self, error: BaseException | None = None) -> None:
        self.part_done(error)

    def add_core_handle(self, handle: Any) -> None:
        """Track a core ``AsyncHandle``; its result goes through ``check``."""
        self.add_part()
        fut = getattr(handle, "_future", None)

        def on_done(result: Any = None, error: BaseException | None = None) -> None:
            if error is None and self.check is not None:
                error = self.check(result)
            self.part_done(error)

        if fut is not None and hasattr(fut, "add_done_callback"):
            def cb(f: Any) -> None:
                exc = f.exception()
                on_done(None if exc is not None else f.result(), exc)

            fut.add_done_callback(cb)
        else:  # no callback hook on this core version: a waiter thread
            def waiter() -> None:
                try:
                    res = handle.wait()
                except BaseException as exc:  # noqa: BLE001 - reported through the work
                    on_done(None, exc)
                else:
                    on_done(res, None)

            threading.Thread(target=waiter, name="pyccl-torch-wait", daemon=True).start()

    def then(self, listener: Callable[[], None]) -> None:
        """Run ``listener`` (on the completion thread) once this op is over."""
        with self._lock:
            if not self._done:
                self._listeners.append(listener)
                return
        listener()

    def _run_completion(self, translate: Callable[["PendingOp", BaseException], BaseException]) -> None:
        error = self._error
        if error is None and self.finish is not None:
            try:
                self.finish()
            except BaseException as exc:  # noqa: BLE001 - reported through the work
                error = exc
        if error is not None and not isinstance(error, BackendError):
            error = translate(self, error)
        self.work._complete(error)
        self.keep = []
        self.finish = None
        with self._lock:
            self._done = True
            listeners, self._listeners = self._listeners, []
        for fn in listeners:
            fn()


class Completer:
    """The dedicated completion thread of one process group."""

    def __init__(self, name: str, translate: Callable[[PendingOp, BaseException], BaseException]) -> None:
        self._q: "queue.SimpleQueue[PendingOp | None]" = queue.SimpleQueue()
        self._translate = translate
        self._thread = threading.Thread(target=self._loop, name=f"pyccl-torch-complete-{name}", daemon=True)
        self._stopped = False
        self._thread.start()

    def submit(self, op: PendingOp) -> None:
        self._q.put(op)

    def _loop(self) -> None:
        while True:
            op = self._q.get()
            if op is None:
                return
            try:
                op._run_completion(self._translate)
            except BaseException:  # noqa: BLE001 - never let the thread die
                log.exception("pyccl: completing %s failed", op.name)

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._q.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def seconds(td: Any, default: float) -> float:
    if isinstance(td, timedelta):
        s = td.total_seconds()
        return s if s > 0 else default
    if isinstance(td, (int, float)) and td > 0:
        return float(td)
    return default

