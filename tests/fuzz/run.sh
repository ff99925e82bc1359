#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of network bytes (README.md here).
#
#   tests/fuzz/run.sh [SECONDS]     # each fuzzer runs SECONDS (default 60)
#
# Builds the libFuzzer harnesses with clang (ASan + UBSan) into build-fuzz/,
# runs each of them and the Python fuzzer (atheris) for SECONDS, starting from
# the seeds and regression inputs in tests/fuzz/corpus/<fuzzer>/ (new inputs
# go to build-fuzz/corpus/<fuzzer>/), and prints executions, coverage and
# findings per fuzzer. Exits non-zero if any fuzzer found a crash, a leak, a
# sanitizer report or a timeout; the input is in build-fuzz/findings/. Keep
# a fixed finding as a regression input: copy it into tests/fuzz/corpus/<fuzzer>/.
set -uo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-60}"
out=build-fuzz
command -v clang++ >/dev/null || { echo "tests/fuzz/run.sh: clang++ is needed (apt-get install clang)" >&2; exit 2; }
python3 -c "import atheris" 2>/dev/null || { echo "tests/fuzz/run.sh: atheris is needed (pip install atheris)" >&2; exit 2; }
cmake -S tests/fuzz -B "$out" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null || exit 1
cmake --build "$out" -j2 >/dev/null || { cmake --build "$out" -j1; exit 1; }
mkdir -p "$out/findings"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
status=0
rows=()
for f in fuzz_data_frames fuzz_state_requests fuzz_handshake fuzz_frames; do
  mkdir -p "$out/corpus/$f"
  if [ "$f" = fuzz_frames ]; then
    cmd=(python3 tests/fuzz/fuzz_frames.py)
  else
    cmd=("$out/$f")
  fi
  log="$out/$f.log"
  "${cmd[@]}" -max_total_time="$secs" -max_len=4096 -timeout=20 -print_final_stats=1 \
    -artifact_prefix="$out/findings/$f-" "$out/corpus/$f" "tests/fuzz/corpus/$f" >"$log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1)
  found=$(ls "$out/findings" 2>/dev/null | grep -c "^$f-" || true)
  if [ "$rc" -ne 0 ] || [ "$found" -ne 0 ]; then
    status=1
    echo "== $f: exit $rc, findings in $out/findings (log $log):" >&2
    grep -E "ERROR|SUMMARY|Traceback|Error" "$log" | head -20 >&2
  fi
  rows+=("$(printf '%-22s %6ss %12s   %-22s %s' "$f" "$secs" "${execs:-?}" "${cov:-?}" "$found")")
done
printf '%-22s %7s %12s   %-22s %s\n' fuzzer time executions coverage findings
printf '%s\n' "${rows[@]}"
exit $status
