#!/usr/bin/env bash
# Builds and runs the C++ unit tests (tests/cpp/) with warnings as errors.
# Usage: tests/cpp/run.sh [build dir, relative to the repository root; default build-tests]
set -euo pipefail
cd "$(dirname "$0")/../.."
dir="${1:-build-tests}"
cmake -S . -B "$dir" -DPYCCL_BUILD_TESTS=ON -DPYCCL_WERROR=ON
cmake --build "$dir" -j2
ctest --test-dir "$dir" --output-on-failure
