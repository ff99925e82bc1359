"""Work objects, per-op bookkeeping, the runner and the completion thread.

One torch-level call (``allreduce``, ``allgather``, ``send``, ...) becomes one
:class:`PendingOp`: a count of outstanding parts (its core collectives, p2p
transfers, earlier ops a barrier waits for), the tensors that must stay alive
until the op is over (the core and the side channel hold raw pointers into
them: a tensor freed early gives wrong results silently), and a ``finish``
step (copies out of staging buffers).

Each process group has two dedicated threads:

* the :class:`Runner` executes the group's core collectives one op at a time
  in issue order (like an NCCL stream: every rank issues the same sequence,
  so every rank runs the same op at the same time) and completes the op on
  the spot when that was its last part, saving a thread hop per op;
* the :class:`Completer` completes ops whose last part finished elsewhere
  (a p2p transfer on a side-channel thread, an earlier op a barrier waited
  for), so such completions never wait behind a collective that blocks.

Futures are completed only on these two threads, never on a core or socket
thread: a future's callbacks run on the thread that completes it. Future callbacks may run on the runner; a callback that
waits for a later collective of the same group makes the runner run the
queued ops itself rather than deadlock.

Failures: ``Future.set_exception`` is visible to Python only; a C++ caller
(the DDP reducer) would see a completed future without tensors and crash. So
:meth:`PycclWork.get_future` hands out ``fut.then(lambda f: f.value())``:
when the base future fails, the callback raises, which marks the child future
failed in C++ too, and ``backward()`` raises a ``RuntimeError`` with the
cause.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

import torch

log = logging.getLogger("pyccl.torch")



def _serve_queue_until(q: queue.SimpleQueue[PendingOp | None], run: Callable[[PendingOp], None],
                       event: threading.Event,
                       timeout: float) -> bool:
    """Run items of ``q`` on the calling thread until ``event`` is set.

    Used when a thread that normally serves ``q`` must wait for an item that
    is behind it in the same queue (a future callback waiting for a later
    op): serving the queue itself is what lets that item complete. A ``None``
    item (shutdown) is put back and ends the serving. Returns False on timeout.
    """
    deadline = time.monotonic() + timeout
    while not event.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            # Short waits so that `event` (set by another thread) is noticed.
            item = q.get(timeout=min(left, 0.05))
        except queue.Empty:
            continue
        if item is None:
            q.put(None)
            return event.wait(max(0.0, deadline - time.monotonic()))
        run(item)
    return True

class BackendError(RuntimeError):
    """Every error of the pyccl torch backend (messages start with ``pyccl:``)."""


def _forward_value(fut: torch.futures.Future[Any]) -> Any:
    return fut.value()


class PycclWork(dist.Work):
    """The Work handed to torch. Only ``wait`` and ``get_future`` are reachable
    from C++ (torch calls no other method of a Python Work); the rest serves
    Python callers."""

    def __init__(self, name: str, timeout: float, result: list[torch.Tensor] | None = None,
                 runner: Runner | None = None, completer: Completer | None = None) -> None:
        super().__init__()
        self._name = name
        self._runner = runner
        self._completer = completer
        self.timeout = timeout  # the op's deadline, enforced by the group's watchdog
        self._result = result if result is not None else []
        self._event = threading.Event()
        self._error: BaseException | None = None
        self._source_rank_value = -1
        self._fut: torch.futures.Future[Any] = torch.futures.Future()
        self._user_fut: torch.futures.Future[Any] = self._fut.then(_forward_value)

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
        """Wait for the op; raise its error if it failed.

        With a positive ``timeout`` (torch passes a timedelta), raise a
        timeout error once it passes; the op goes on (torch's
        ``Work.wait(timeout)`` contract). Without one, the op's own timeout
        bounds the wait: the group's watchdog fails the op when it passes.
        """
        given = timeout.total_seconds() if isinstance(timeout, timedelta) else (timeout or 0.0)
        # Without a timeout, the watchdog completes the op by its deadline;
        # the margin only guards against a bug leaving a caller stuck forever.
        seconds = given if given > 0 else self.timeout + 60.0
        if self._event.is_set():
            done = True
        elif self._runner is not None and self._runner.on_runner():
            done = self._runner.help_until(self._event, seconds)
        elif self._completer is not None and self._completer.on_completer():
            done = self._completer.help_until(self._event, seconds)
        else:
            done = self._event.wait(seconds)
        if not done:
            raise BackendError(f"pyccl: {self._name} Timed out waiting {seconds * 1000:.0f} ms in Work.wait(); "
                               "the op itself goes on")
        if self._error is not None:
            raise BackendError(str(self._error)) from self._error
        return True

    def get_future(self) -> torch.futures.Future[Any]:
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


class PendingOp:
    """Book-keeping of one torch-level op until its Work completes.

    The op starts with one outstanding part, the *issue* part, which the
    issuer releases with :meth:`issued` after it has added every real part;
    so an op can never complete while it is still being issued. ``calls``
    are the op's core collectives (closures returning a ReduceInfo), run in
    order by the group's runner as one more part.
    """

    __slots__ = ("name", "work", "keep", "finish", "calls", "check", "inline_thread", "_pending", "_error",
                 "_lock", "_completer", "_listeners", "_done")

    def __init__(
        self,
        name: str,
        work: PycclWork,
        completer: Completer,
        check: Callable[[Any], BaseException | None] | None = None,
    ) -> None:
        self.name = name
        self.work = work
        self.keep: list[Any] = []
        self.finish: Callable[[], None] | None = None
        self.calls: list[Callable[[], Any]] = []
        self.check = check  # result of a core op -> error (membership changed) or None
        self.inline_thread: threading.Thread | None = None  # may complete here (synchronous call)
        self._pending = 1
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._completer = completer
        self._listeners: list[Callable[[], None]] = []
        self._done = False

    def add_part(self) -> None:
        with self._lock:
            self._pending += 1

    def only_issue_part(self) -> bool:
        with self._lock:
            return self._pending == 1

    def part_done(self, error: BaseException | None = None) -> None:
        """Any thread: one part is over (with an error, or not)."""
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._pending -= 1
            ready = self._pending == 0
        if ready:
            self._completer.complete(self)

    def issued(self, error: BaseException | None = None) -> None:
        self.part_done(error)

    def run_calls(self) -> None:
        """On the runner: the op's core collectives, in order; stop at the first failure."""
        calls, self.calls = self.calls, []
        error: BaseException | None = None
        for call in calls:
            try:
                result = call()
            except BaseException as exc:  # noqa: BLE001 - reported through the work
                error = exc
                break
            if self.check is not None:
                error = self.check(result)
                if error is not None:
                    break
        self.part_done(error)

    def then(self, listener: Callable[[], None]) -> None:
        """Run ``listener`` (on a completion thread) once this op is over."""
        with self._lock:
            if not self._done:
                self._listeners.append(listener)
                return
        listener()

    def _run_completion(self, translate: Callable[[PendingOp, BaseException], BaseException]) -> None:
        error = self._error
        if error is None and self.finish is not None:
            try:
                with torch.no_grad():  # copies into parameters (leaves that require grad)
                    self.finish()
            except BaseException as exc:  # noqa: BLE001 - reported through the work
                error = exc
        if error is not None and not isinstance(error, BackendError):
            error = translate(self, error)
        with self._lock:
            self._done = True
            listeners, self._listeners = self._listeners, []
        for fn in listeners:  # (book-keeping first: a future callback may issue the next op)
            fn()
        self.work._complete(error)
        self.keep = []
        self.finish = None


class Completer:
    """The completion thread of one process group (see the module docstring).

    :meth:`complete` runs an op's completion at once when called on one of
    the group's dedicated threads (the runner or this one), else hands it to
    this thread.
    """

    def __init__(self, name: str, translate: Callable[[PendingOp, BaseException], BaseException]) -> None:
        self._q: queue.SimpleQueue[PendingOp | None] = queue.SimpleQueue()
        self._translate = translate
        self._thread = threading.Thread(target=self._loop, name=f"pyccl-torch-complete-{name}", daemon=True)
        self._inline: set[threading.Thread] = {self._thread}
        self._stopped = False
        self._thread.start()

    def allow_inline(self, thread: threading.Thread) -> None:
        self._inline.add(thread)

    def on_completer(self) -> bool:
        return threading.current_thread() is self._thread

    def help_until(self, event: threading.Event, timeout: float) -> bool:
        """A future callback on this thread waits for another op: complete
        queued ops here until ``event`` is set."""
        return _serve_queue_until(self._q, self._run, event, timeout)

    def complete(self, op: PendingOp) -> None:
        me = threading.current_thread()
        if me in self._inline or op.inline_thread is me:
            self._run(op)
        else:
            self._q.put(op)

    def _run(self, op: PendingOp) -> None:
        try:
            op._run_completion(self._translate)
        except BaseException:
            log.exception("pyccl: completing %s failed", op.name)

    def _loop(self) -> None:
        while True:
            op = self._q.get()
            if op is None:
                return
            self._run(op)

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._q.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


class Runner:
    """Runs a process group's core collectives, one op at a time, in issue order."""

    def __init__(self, name: str, completer: Completer) -> None:
        self._q: queue.SimpleQueue[PendingOp | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"pyccl-torch-run-{name}", daemon=True)
        self._queued = 0  # submitted and not yet run
        self._count_lock = threading.Lock()
        completer.allow_inline(self._thread)
        self._stopped = False
        self._thread.start()

    def submit(self, op: PendingOp) -> None:
        with self._count_lock:
            self._queued += 1
        self._q.put(op)

    def idle(self) -> bool:
        """Nothing queued or running (stable while the caller holds the group's issue lock)."""
        with self._count_lock:
            return self._queued == 0

    def on_runner(self) -> bool:
        return threading.current_thread() is self._thread

    def _loop(self) -> None:
        while True:
            op = self._q.get()
            if op is None:
                return
            self._run(op)

    def _run(self, op: PendingOp) -> None:
        try:
            op.run_calls()
        except BaseException:
            log.exception("pyccl: running %s failed", op.name)
        finally:
            with self._count_lock:
                self._queued -= 1

    def help_until(self, event: threading.Event, timeout: float) -> bool:
        """A future callback on the runner waits for a later op: run the queue
        here until ``event`` is set (ops keep their order)."""
        return _serve_queue_until(self._q, self._run, event, timeout)

    def stop(self, timeout: float = 30.0) -> None:
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
