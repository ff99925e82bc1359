"""Driver of PyTorch's distributed test suite (``DistributedTest._DistTestBase``)
for one backend and one world size. Started by ``run.py``; not a pytest module.

The equivalent of upstream ``test/distributed/test_distributed_spawn.py`` (not
shipped in the wheel): a ``TestDistBackend`` subclass mixing in
``_DistTestBase``; every test spawns WORLD_SIZE rank processes which
``init_process_group(backend=BACKEND, init_method=file://...)``.

Environment (set by run.py):
    BACKEND=gloo            what the suite branches on (always "gloo" here)
    WORLD_SIZE=2|3
    CONFORMANCE_IMPL=gloo|pyccl
        pyccl: in every rank process, every process group the suite asks for
        with backend "gloo" (default group, new_group, new_subgroups, ...) is
        created with backend "pyccl" instead: the wrap is on
        torch.distributed.distributed_c10d._new_process_group_helper, which
        every group creation goes through. The suite still sees BACKEND=gloo,
        so it takes gloo's path wherever it branches on the backend name;
        torch's own checks (dist.get_backend(...) == "gloo") see "pyccl".
        After init each rank asserts that the default group is a
        ProcessGroupPyccl and dist.get_backend() == "pyccl" (exit != 0
        otherwise), and logs every group creation to CONFORMANCE_GROUPLOG.
    CONFORMANCE_START=forkserver|spawn
        spawn is upstream's start method (each rank re-imports torch, ~4 s
        on this machine); forkserver preloads torch and the suite once and
        forks ranks from that clean server (no parent state is inherited
        beyond imported modules). The per-test environment (TEMP_DIR,
        INIT_METHOD, ...) is passed to the rank explicitly.
    CONFORMANCE_TIMEOUT     seconds per test (the suite's own join timeout,
                            which terminates the ranks); a SIGALRM backstop
                            fires 60 s later in the parent.

Usage: python suite_driver.py --json OUT.json [-k SUBSTR ...] [--tests-file F]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import traceback
import unittest

os.environ.setdefault("BACKEND", "gloo")
os.environ.setdefault("WORLD_SIZE", "2")
if "TEMP_DIR" not in os.environ:  # read at import by nothing, but keep upstream's contract
    import tempfile

    os.environ["TEMP_DIR"] = tempfile.mkdtemp(prefix="torchconf-")

# upstream's ranks import the suite after setUp set INIT_METHOD to a file://
# URL (initialize_temp_directories); the suite reads it at import
# (test_barrier_timeout_global re-initialises with it and is skipped unless
# it is file://). Here the suite is imported once: set it now, and refresh the
# suite's global in every rank (_run).
os.environ.setdefault("INIT_METHOD", "file://" + os.path.join(os.environ["TEMP_DIR"], "init_dir", "shared_init_file"))

IMPL = os.environ.get("CONFORMANCE_IMPL", "gloo")
START = os.environ.get("CONFORMANCE_START", "forkserver")
TIMEOUT = int(os.environ.get("CONFORMANCE_TIMEOUT", "120"))
os.environ["DISTRIBUTED_TESTS_DEFAULT_TIMEOUT"] = str(TIMEOUT)

import torch.distributed as dist  # noqa: E402
import torch.testing._internal.common_distributed as common_distributed  # noqa: E402
from torch.testing._internal.distributed.distributed_test import (  # noqa: E402
    DistributedTest,
    TestDistBackend,
)

import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False

# The suite's join timeout: one bound for every test (upstream: 300 s, 400 s
# for test_ddp_uneven_inputs, 500 s for test_DistributedDataParallel).
common_distributed.TIMEOUT_DEFAULT = TIMEOUT
for _k in list(common_distributed.TIMEOUT_OVERRIDE):
    common_distributed.TIMEOUT_OVERRIDE[_k] = min(common_distributed.TIMEOUT_OVERRIDE[_k], TIMEOUT)

# Environment variables a rank must see as the parent has them when it starts.
_PASS_ENV = ("TEMP_DIR", "INIT_METHOD", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "BACKEND",
             "TORCH_DISTRIBUTED_DEBUG", "TORCH_SHOW_CPP_STACKTRACES")


# ------------------------------------------------------------------ pyccl redirect


def _map_backend(backend):
    """'gloo' -> 'pyccl', also inside 'cpu:gloo,cuda:nccl' specs."""
    s = str(backend) if backend is not None else None
    if s is None:
        return backend
    if s.lower() == "gloo":
        return dist.Backend("pyccl")
    if ":" in s or "," in s:
        parts = []
        for part in s.split(","):
            dev, _, b = part.partition(":")
            parts.append(f"{dev}:pyccl" if b.strip().lower() == "gloo" else part)
        return ",".join(parts)
    return backend


def _log_group(entry):
    path = os.environ.get("CONFORMANCE_GROUPLOG")
    if not path:
        return
    entry.update(pid=os.getpid(), test=os.environ.get("CONFORMANCE_TEST", "?"))
    line = json.dumps(entry) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def install_pyccl_redirect():
    import pyccl.torch  # registers the backend "pyccl"
    from torch.distributed import distributed_c10d as c10d

    orig = c10d._new_process_group_helper
    if getattr(orig, "_conformance_wrapped", False):
        return

    def helper(group_size, group_rank, global_ranks_in_group, backend=None, *args, **kwargs):
        if "backend" in kwargs:
            backend = kwargs.pop("backend")
        mapped = _map_backend(backend)
        pg, store = orig(group_size, group_rank, global_ranks_in_group, mapped, *args, **kwargs)
        _log_group({"requested": str(backend), "used": str(mapped), "pyccl": pyccl.torch.__file__,
                    "ranks": list(global_ranks_in_group),
                    "pg_type": type(pg).__name__ if pg is not None else None})
        return pg, store

    helper._conformance_wrapped = True
    c10d._new_process_group_helper = helper


# ------------------------------------------------------------------ test class


class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    def setUp(self):
        super().setUp()
        self._spawn_processes()
        torch.backends.cudnn.flags(enabled=True, allow_tf32=False).__enter__()

    def _spawn_processes(self) -> None:
        ctx = torch.multiprocessing.get_context(START)
        self._start_processes(ctx.Process)

    def _start_processes(self, proc) -> None:
        # upstream MultiProcessTestCase._start_processes, plus the environment
        # (forkserver ranks do not inherit the parent's current os.environ).
        self.processes = []
        env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        env["CONFORMANCE_TEST"] = self._current_test_name()
        for rank in range(int(self.world_size)):
            parent_conn, child_conn = torch.multiprocessing.Pipe()
            process = proc(
                target=self.__class__._run,
                name="process " + str(rank),
                args=(rank, self._current_test_name(), self.file_name, child_conn),
                kwargs={"fake_pg": getattr(self, "fake_pg", False), "conformance_env": env},
            )
            process.start()
            self.pid_to_pipe[process.pid] = parent_conn
            self.processes.append(process)

    def tearDown(self):
        procs = list(self.processes)
        super().tearDown()  # terminates the ranks
        for p in procs:  # and makes sure they are gone
            p.join(10)
            if p.exitcode is None:
                p.kill()
                p.join(5)

    @classmethod
    def _run(cls, rank, test_name, file_name, pipe, **kwargs):
        env = kwargs.pop("conformance_env", None) or {}
        os.environ.update(env)
        import torch.testing._internal.distributed.distributed_test as suite

        suite.INIT_METHOD = os.environ.get("INIT_METHOD", suite.INIT_METHOD)
        if IMPL == "pyccl":
            install_pyccl_redirect()
            if os.environ.get("CONFORMANCE_NAME_BRANCHES", "1") == "1":
                # Where the suite branches on the *runtime* backend name
                # (dist.get_backend() in <list containing gloo>), put pyccl on
                # gloo's side too: the profiler checks (events named
                # "<backend>:<op>", e.g. "pyccl:all_reduce") then apply to
                # pyccl as they do to gloo instead of being skipped.
                for lst in (suite.PROFILING_SUPPORTED_BACKENDS, suite.CUDA_PROFILING_SUPPORTED_BACKENDS,
                            suite.SEND_RECV_PROFILING_SUPPORTED_BACKENDS):
                    if "pyccl" not in lst:
                        lst.append("pyccl")
            orig_init = dist.init_process_group

            def checked_init(*a, **kw):
                orig_init(*a, **kw)
                pg = dist.distributed_c10d._get_default_group()
                name = dist.get_backend()
                if name != "pyccl" or type(pg).__name__ != "ProcessGroupPyccl":
                    raise SystemExit(f"conformance: default group is {type(pg).__name__} / {name}, not pyccl")

            dist.init_process_group = checked_init
        try:
            return super()._run(rank, test_name, file_name, pipe, **kwargs)
        except Exception:
            # failures outside the test body (init_process_group, the suite's
            # barriers) do not reach the parent through the pipe: leave them
            # where the parent's result recorder finds them.
            _save_rank_error(test_name, rank, traceback.format_exc())
            raise


def _rank_error_dir() -> str | None:
    d = os.environ.get("CONFORMANCE_ERRDIR")
    if d:
        os.makedirs(d, exist_ok=True)
    return d


def _save_rank_error(test_name: str, rank: int, text: str) -> None:
    d = _rank_error_dir()
    if d:
        with open(os.path.join(d, f"{test_name}.rank{rank}.txt"), "w") as f:
            f.write(text)


def _rank_errors(test_name: str) -> str:
    d = _rank_error_dir()
    if not d:
        return ""
    out = []
    for fn in sorted(os.listdir(d)):
        if fn.startswith(test_name + ".rank"):
            with open(os.path.join(d, fn)) as f:
                out.append(f"Process {fn[len(test_name) + 5:-4]} exited with error code 1 and exception:\n{f.read()}")
    return "\n".join(out)


# ------------------------------------------------------------------ running


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Timeout|Interrupt)\w*)(:|$)")


def _first_section(text: str) -> list[str]:
    text = re.sub(r"(?m)^\[rank\d+\]:\S+ \S+ \d+ \S+\] ", "", text)  # torch's per-rank log prefix
    sections = re.split(r"(?m)^(?:RuntimeError: )?Process \d+ exited with error code \d+ and exception:[ \t]*$", text)
    body = sections[1] if len(sections) > 1 else text
    return body.splitlines()


def first_error_line(text: str) -> str:
    """The exception line of the first failing rank (or of the parent), with
    torch's "Expected X but got Y." where an assertEqual gives one."""
    if not text:
        return ""
    lines = _first_section(text)
    # the last exception line of the first traceback block (chained exceptions: the final one)
    idx = [i for i, ln in enumerate(lines) if _EXC_LINE.match(ln)]
    if idx:
        i = idx[-1]
        msg = lines[i].strip()
        for ln in lines[i + 1:i + 4]:
            if ln.startswith("Expected ") or ln.startswith("Mismatched elements"):
                msg += " " + ln.strip()
                break
        return msg[:400]
    for ln in reversed(lines):
        if ln.strip():
            return ln.strip()[:400]
    return ""


def error_site(text: str) -> str:
    """The innermost frame of the suite (distributed_test.py) in the first failing rank."""
    lines = _first_section(text)
    site = ""
    for i, ln in enumerate(lines):
        m = re.match(r'\s*File ".*/(distributed_test\.py|common_distributed\.py)", line (\d+), in (\w+)', ln)
        if m and m.group(1) == "distributed_test.py":
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            site = f"{m.group(1)}:{m.group(2)} {m.group(3)}: {code}"[:300]
    return site


class RecordingResult(unittest.TextTestResult):
    def __init__(self, *a, record=None, json_path=None, **kw):
        super().__init__(*a, **kw)
        self.record = record
        self.json_path = json_path
        self._t0 = 0.0

    def _name(self, test):
        return test.id().split(".")[-1]

    def _put(self, test, outcome, message="", detail=""):
        name = self._name(test)
        self.record[name] = {
            "outcome": outcome,
            "seconds": round(time.monotonic() - self._t0, 2),
            "message": message,
            "where": error_site(detail) if detail else "",
            "detail": detail if len(detail) <= 16000 else detail[:8000] + "\n[...]\n" + detail[-8000:],
        }
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.record, f, indent=1, sort_keys=True)
        os.replace(tmp, self.json_path)

    def startTest(self, test):
        self._t0 = time.monotonic()
        signal.alarm(TIMEOUT + 60)
        print(f"=== START {self._name(test)} {time.strftime('%H:%M:%S')}", flush=True)
        super().startTest(test)

    def stopTest(self, test):
        signal.alarm(0)
        super().stopTest(test)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._put(test, "passed")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._put(test, "skipped", str(reason)[:300])

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._put(test, "passed", "expected failure")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._put(test, "failed", "unexpected success")

    def _bad(self, test, err):
        text = "".join(traceback.format_exception(*err))
        extra = _rank_errors(self._name(test))
        if extra and "exited with error code" not in text:
            text = extra + "\n(parent) " + text
        if re.search(r"terminated or timed out after|conformance backstop timeout", text):
            self._put(test, "timeout", first_error_line(text), text)
        else:
            self._put(test, "failed", first_error_line(text), text)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._bad(test, err)

    def addError(self, test, err):
        super().addError(test, err)
        self._bad(test, err)


def _alarm(signum, frame):
    raise TimeoutError(f"conformance backstop timeout ({TIMEOUT + 60} s)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("-k", action="append", default=[], help="substring of the test name (any matches)")
    ap.add_argument("--tests-file", help="file with exact test names, one per line")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()

    loader = unittest.TestLoader()
    names = sorted(loader.getTestCaseNames(TestDistBackendWithSpawn))
    if args.tests_file:
        with open(args.tests_file) as f:
            wanted = {ln.strip() for ln in f if ln.strip()}
        names = [n for n in names if n in wanted]
    if args.k:
        names = [n for n in names if any(k in n for k in args.k)]
    if args.list:
        print("\n".join(names))
        return 0
    if IMPL == "pyccl":
        import pyccl.torch

        print(f"conformance: pyccl from {os.path.dirname(pyccl.torch.__file__)}", flush=True)
    if START == "forkserver":
        # the same preload for both impls (pyccl.torch only registers the
        # backend at import; its groups, threads and sockets start in the ranks)
        pre = ["torch", "torch.testing._internal.distributed.distributed_test"]
        if IMPL == "pyccl":
            pre.append("pyccl.torch")
        torch.multiprocessing.get_context("forkserver").set_forkserver_preload(pre)
    signal.signal(signal.SIGALRM, _alarm)
    suite = unittest.TestSuite(TestDistBackendWithSpawn(n) for n in names)
    record: dict = {}
    runner = unittest.TextTestRunner(
        stream=sys.stdout, verbosity=2,
        resultclass=lambda *a, **kw: RecordingResult(*a, record=record, json_path=args.json, **kw),
    )
    print(f"conformance: impl={IMPL} BACKEND={os.environ['BACKEND']} WORLD_SIZE={os.environ['WORLD_SIZE']} "
          f"start={START} timeout={TIMEOUT}s tests={len(names)}", flush=True)
    runner.run(suite)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
