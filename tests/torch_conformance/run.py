#!/usr/bin/env python3
"""Run PyTorch's distributed test suite against gloo and against pyccl (taking
gloo's path in the suite), and compare.

    PYTHONPATH=<pyccl checkout with built core> python3 tests/torch_conformance/run.py \
        --impl gloo pyccl --world-size 2 3 [-k allreduce] [--timeout 120] \
        [--max-seconds 7200] [--out build/torch_conformance]

Needs torch (CPU is enough) and ``pip install expecttest``. Not collected by
the default pytest run (no test_*.py here). See tests/torch_conformance/README.md.

Writes, under --out:
    <impl>-ws<N>.json      per-test outcome (passed/failed/timeout/skipped), seconds,
                           first error line, error tail
    <impl>-ws<N>.log       the suite's output (rank tracebacks included)
    <impl>-ws<N>.groups.jsonl  (pyccl) every process group created in a rank:
                           requested backend, backend used, pg type
    summary.json, summary.md   table per impl and world size, and the diff:
                           tests gloo passes but pyccl does not, with the first
                           error line of each
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "suite_driver.py"

# Tests that torch itself restricts to a process group whose backend is named
# "gloo" (a check on the backend *name* in torch, not in the suite): with
# pyccl they fail by construction. See README.md for the exact checks.
GLOO_NAME_RESTRICTED = {
    # torch.distributed.monitored_barrier: get_backend(group) != Backend.GLOO -> ValueError
    # (test_monitored_barrier_gloo_rank_0_timeout calls pg.monitored_barrier: not restricted)
    "test_monitored_barrier_allreduce_hang",  # NCCL + GPUs
    "test_monitored_barrier_allreduce_hang_wait_all_ranks",  # NCCL + GPUs
    "test_monitored_barrier_failure_order",  # world size >= 8
    "test_monitored_barrier_gloo",
    "test_monitored_barrier_gloo_subgroup",
    "test_monitored_barrier_wait_all_ranks",  # world size >= 8
}
# Tests that assert the backend's name equals BACKEND ("gloo"): cannot pass
# while the suite takes gloo's path and the group is (honestly) "pyccl".
NAME_ASSERTED = {"test_get_backend"}


def pyccl_source(pythonpath: str) -> Path | None:
    """The pyccl package directory the ranks would import."""
    code = "import pyccl, os; print(os.path.dirname(pyccl.__file__))"
    env = dict(os.environ, PYTHONPATH=pythonpath)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    return Path(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else None


def source_state(pkg: Path) -> dict:
    """git commit and dirty files of the checkout holding ``pkg``, and a digest of its sources."""
    import hashlib

    root = pkg.parent
    state: dict = {"package": str(pkg)}
    r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode == 0:
        state["commit"] = r.stdout.strip()
        r = subprocess.run(["git", "-C", str(root), "status", "--short", "--", "pyccl"], capture_output=True, text=True)
        state["dirty"] = [ln.strip() for ln in r.stdout.splitlines()]
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*")):
        if f.is_file() and f.suffix in (".py", ".so"):
            h.update(str(f.relative_to(pkg)).encode())
            h.update(f.read_bytes())
    state["sha256"] = h.hexdigest()[:16]
    return state


def snapshot(pkg: Path, dest: Path) -> Path:
    """Copy the pyccl package (sources and compiled core) so that a run sees one
    consistent version while the checkout is being edited."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(pkg, dest / "pyccl", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def take_snapshot(pythonpath: str, dest: Path, tries: int = 20) -> tuple[Path, dict]:
    """One copy of the pyccl package for the whole invocation (every part and
    world size runs the same code), retried until it imports: the checkout may
    be caught mid-edit."""
    pkg = pyccl_source(pythonpath)
    if pkg is None:
        raise SystemExit("pyccl is not importable: set PYTHONPATH to a checkout with the built core")
    check = "import pyccl.torch, pyccl.torch.process_group; from pyccl import _core; print(pyccl.torch.__file__)"
    for attempt in range(tries):
        state = source_state(pkg)
        snapshot(pkg, dest)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(dest), pythonpath) if p))
        r = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True,
                           cwd=tempfile.gettempdir())
        if r.returncode == 0 and r.stdout.strip().startswith(str(dest)) and source_state(pkg)["sha256"] == state["sha256"]:
            state["snapshot"] = str(dest / "pyccl")
            print(f"pyccl snapshot: {state}", flush=True)
            return dest, state
        print(f"pyccl snapshot attempt {attempt + 1} not usable (mid-edit?): {r.stderr.strip()[-300:]}", flush=True)
        time.sleep(5)
    raise SystemExit("could not take a consistent snapshot of pyccl")


def run_one(impl: str, ws: int, args, out: Path, deadline: float, tests_file: str | None = None,
            part: int | None = None) -> dict:
    """One driver process: ``impl`` at world size ``ws`` on the selected tests.
    With ``part``, results go to ``<impl>-ws<N>.part<i>.json`` and the log and
    group log are appended to (interleaved runs)."""
    tag = f"{impl}-ws{ws}"
    json_path = out / (f"{tag}.json" if part is None else f"{tag}.part{part}.json")
    log_path = out / f"{tag}.log"
    groups = out / f"{tag}.groups.jsonl"
    for p in ((json_path, log_path, groups) if not part else (json_path,)):
        if p.exists():
            p.unlink()
    tmp = tempfile.mkdtemp(prefix=f"torchconf-{tag}-")
    env = dict(os.environ)
    env.update(
        BACKEND="gloo",  # what the suite branches on, for both impls
        WORLD_SIZE=str(ws),
        TEMP_DIR=tmp,
        MASTER_ADDR="127.0.0.1",
        CONFORMANCE_IMPL=impl,
        CONFORMANCE_START=args.start,
        CONFORMANCE_TIMEOUT=str(args.timeout),
        CONFORMANCE_GROUPLOG=str(groups),
        CONFORMANCE_ERRDIR=os.path.join(tmp, "rank_errors"),
        PYTHONUNBUFFERED="1",
        CONFORMANCE_NAME_BRANCHES="1" if args.name_branches else "0",
    )
    src: dict = {}
    if impl == "pyccl":
        env.setdefault("PYCCL_HOST", "127.0.0.1")
        pkg = pyccl_source(env.get("PYTHONPATH", ""))
        if pkg is None:
            raise SystemExit("pyccl is not importable: set PYTHONPATH to a checkout with the built core")
        if args.snapshot:
            snap, src = args.snapshot_dir, args.snapshot_state
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(snap), env.get("PYTHONPATH", "")) if p)
        else:
            src = source_state(pkg)
        print(f"  pyccl: {src}", flush=True)
    cmd = ["nice", "-n", str(args.nice), sys.executable, str(DRIVER), "--json", str(json_path)]
    for k in args.k:
        cmd += ["-k", k]
    tests_file = tests_file or args.tests_file
    if tests_file:
        cmd += ["--tests-file", tests_file]
    budget = max(30.0, deadline - time.monotonic())
    print(f"[{time.strftime('%H:%M:%S')}] {tag}{'' if part is None else f' part {part}'}: "
          f"{' '.join(cmd)} (budget {budget:.0f} s)", flush=True)
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    truncated = False
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            truncated = True
        finally:
            # the driver, its forkserver and any rank left: one process group
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                time.sleep(2)
            proc.wait()
    wall = time.monotonic() - t0
    shutil.rmtree(tmp, ignore_errors=True)
    record = json.loads(json_path.read_text()) if json_path.exists() else {}
    return {"impl": impl, "world_size": ws, "wall_s": round(wall, 1), "rc": proc.returncode,
            "truncated": truncated, "record": record, "pyccl_source": src, "started": started}


def tally(parts: list[dict], out: Path) -> dict:
    """Merge the parts of one impl and world size; write ``<impl>-ws<N>.json``."""
    impl, ws = parts[0]["impl"], parts[0]["world_size"]
    tag = f"{impl}-ws{ws}"
    record: dict = {}
    for p in parts:
        record.update(p["record"])
    (out / f"{tag}.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    for f in out.glob(f"{tag}.part*.json"):
        f.unlink()
    counts = {k: 0 for k in ("passed", "failed", "timeout", "skipped")}
    for r in record.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    group_stats: dict = {}
    groups = out / f"{tag}.groups.jsonl"
    if groups.exists():
        for line in groups.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            key = f"{e['requested']}->{e['used']}:{e['pg_type']}"
            group_stats[key] = group_stats.get(key, 0) + 1
            if "pyccl" in e:
                group_stats.setdefault("pyccl_modules", [])
                if e["pyccl"] not in group_stats["pyccl_modules"]:
                    group_stats["pyccl_modules"].append(e["pyccl"])
    res = {"impl": impl, "world_size": ws, "wall_s": round(sum(p["wall_s"] for p in parts), 1),
           "rc": [p["rc"] for p in parts], "truncated": any(p["truncated"] for p in parts),
           "ran": len(record), **counts, "groups": group_stats,
           "pyccl_source": [p["pyccl_source"] for p in parts if p["pyccl_source"]][:1],
           "started": parts[0]["started"], "parts": len(parts)}
    print(f"[{time.strftime('%H:%M:%S')}] {tag}: {res}", flush=True)
    return res


def list_tests(ws: int, args) -> list[str]:
    env = dict(os.environ, BACKEND="gloo", WORLD_SIZE=str(ws), CONFORMANCE_IMPL="gloo")
    cmd = [sys.executable, str(DRIVER), "--json", os.devnull, "--list"]
    for k in args.k:
        cmd += ["-k", k]
    if args.tests_file:
        cmd += ["--tests-file", args.tests_file]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    names = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    if args.first_file:
        first = [ln.strip() for ln in Path(args.first_file).read_text().splitlines() if ln.strip()]
        rank = {n: i for i, n in enumerate(first)}
        names.sort(key=lambda n: (rank.get(n, len(rank)), n))
    return names


def load(out: Path, impl: str, ws: int) -> dict:
    p = out / f"{impl}-ws{ws}.json"
    return json.loads(p.read_text()) if p.exists() else {}


def summarize(out: Path, runs: list[dict], world_sizes: list[int]) -> str:
    lines = ["| backend | world size | passed | failed | timeout | skipped | ran | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['impl']} | {r['world_size']} | {r['passed']} | {r['failed']} | {r['timeout']} | "
                     f"{r['skipped']} | {r['ran']}{' (cut)' if r['truncated'] else ''} | {r['wall_s']} |")
    diff_all = {}
    for ws in world_sizes:
        g, p = load(out, "gloo", ws), load(out, "pyccl", ws)
        diff = []
        for name in sorted(g):
            if g[name]["outcome"] != "passed" or name not in p:
                continue
            if p[name]["outcome"] != "passed":
                diff.append({"test": name, "outcome": p[name]["outcome"], "error": p[name]["message"],
                             "where": p[name].get("where", ""),
                             "gloo_restricted": name in GLOO_NAME_RESTRICTED,
                             "name_asserted": name in NAME_ASSERTED})
        diff_all[ws] = diff
        if g and p:
            lines += ["", f"### gloo passes, pyccl does not (world size {ws}): {len(diff)}", ""]
            for d in diff:
                mark = (" [torch restricts to gloo]" if d["gloo_restricted"] else
                        " [suite asserts the name gloo]" if d.get("name_asserted") else "")
                where = f" [at {d['where']}]" if d.get("where") else ""
                lines.append(f"- `{d['test']}` ({d['outcome']}){mark}: {d['error']}{where}")
    (out / "summary.json").write_text(json.dumps({"runs": runs, "diff": diff_all}, indent=1))
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", nargs="+", default=["gloo", "pyccl"], choices=["gloo", "pyccl"])
    ap.add_argument("--world-size", nargs="+", type=int, default=[2, 3])
    ap.add_argument("-k", action="append", default=[], help="run tests whose name contains this (repeatable)")
    ap.add_argument("--tests-file", help="run exactly the tests named in this file")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per test (default 120)")
    ap.add_argument("--max-seconds", type=float, default=4 * 3600, help="bound on the whole run")
    ap.add_argument("--start", choices=["forkserver", "spawn"], default="forkserver",
                    help="how ranks start (spawn: upstream's, slower)")
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--no-name-branches", dest="name_branches", action="store_false",
                    help="do not put pyccl on gloo's side of the suite's dist.get_backend() lists (profiler checks)")
    ap.add_argument("--interleave", type=int, default=1, metavar="K",
                    help="split the tests into K chunks and run every impl on chunk i before chunk i+1")
    ap.add_argument("--first-file", help="with --interleave: run the tests named in this file first, in its order")
    ap.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                    help="import pyccl from PYTHONPATH live (default: a copy taken when each run starts)")
    ap.add_argument("--out", default="build/torch_conformance")
    ap.add_argument("--summarize-only", action="store_true", help="rebuild summary from existing JSON files")
    args = ap.parse_args()
    if args.tests_file:
        args.tests_file = str(Path(args.tests_file).resolve())
    if args.first_file:
        args.first_file = str(Path(args.first_file).resolve())
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    if args.summarize_only:
        prev = out / "summary.json"
        runs = json.loads(prev.read_text())["runs"] if prev.exists() else []
    else:
        deadline = time.monotonic() + args.max_seconds
        snap_root = None
        if "pyccl" in args.impl and args.snapshot:
            snap_root = tempfile.mkdtemp(prefix="torchconf-pyccl-")
            args.snapshot_dir, args.snapshot_state = take_snapshot(os.environ.get("PYTHONPATH", ""),
                                                                   Path(snap_root) / "snap")
        for ws in args.world_size:
            if args.interleave <= 1:
                for impl in args.impl:
                    if time.monotonic() >= deadline:
                        print(f"skipping {impl}-ws{ws}: --max-seconds used up", flush=True)
                        continue
                    runs.append(tally([run_one(impl, ws, args, out, deadline)], out))
                continue
            # interleaved: chunk i of every impl before chunk i+1, so that a run
            # cut by --max-seconds covers the same tests for every impl
            names = list_tests(ws, args)
            n = args.interleave
            chunks = [names[i * len(names) // n:(i + 1) * len(names) // n] for i in range(n)]
            parts: dict = {impl: [] for impl in args.impl}
            for i, chunk in enumerate(chunks):
                if not chunk:
                    continue
                if time.monotonic() >= deadline:
                    print(f"ws{ws}: --max-seconds used up before chunk {i}", flush=True)
                    break
                cf = out / f"ws{ws}.chunk{i}.txt"
                cf.write_text("\n".join(chunk) + "\n")
                for impl in args.impl:
                    parts[impl].append(run_one(impl, ws, args, out, deadline, tests_file=str(cf), part=i))
                cf.unlink()
            for impl in args.impl:
                if parts[impl]:
                    runs.append(tally(parts[impl], out))
        if snap_root:
            shutil.rmtree(snap_root, ignore_errors=True)
        prev = out / "summary.json"
        if prev.exists():  # keep results of runs not repeated this time
            old = [r for r in json.loads(prev.read_text()).get("runs", [])
                   if (r["impl"], r["world_size"]) not in {(x["impl"], x["world_size"]) for x in runs}]
            runs = old + runs
    runs.sort(key=lambda r: (r["world_size"], r["impl"]))
    print(summarize(out, runs, sorted({r["world_size"] for r in runs})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
