#!/usr/bin/env bash
# tools/check.sh — the whole test suite, as CI runs it (.ci/run calls this).
#
#  1. Release build with -Werror (CUDA compiled whenever nvcc exists, so a
#     broken CUDA build fails here instead of being skipped), full ctest.
#  2. ASan + UBSan build with -DMOE_CUDA=OFF, full ctest.
#  3. Fuzzing: the committed corpora replayed under libFuzzer, then
#     MOE_FUZZ_SECONDS (default 12) seconds of fresh fuzzing per target
#     (6 targets: 72 seconds).
#
# Installs the Debian packages it needs (tools/deps.sh) or says which.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/deps.sh test

jobs=$(nproc)
cuda=OFF
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
	cuda=ON
	command -v nvcc >/dev/null 2>&1 || export PATH=/usr/local/cuda/bin:$PATH
fi

summary=()
run_suite() { # name builddir cmake-args...
	local name=$1 dir=$2
	shift 2
	echo "== $name: configure and build ($*)"
	cmake -S . -B "$dir" -DMOE_WERROR=ON "$@" >"$dir.configure.log" 2>&1 ||
		{ cat "$dir.configure.log"; exit 1; }
	cmake --build "$dir" -j"$jobs" >"$dir.build.log" 2>&1 ||
		{ tail -60 "$dir.build.log"; echo "$name: BUILD FAILED"; exit 1; }
	echo "== $name: tests"
	local log=$PWD/$dir.ctest.log
	if ! (cd "$dir" && ctest --output-on-failure -j"$jobs" 2>&1 | tee "$log" |
		grep -E "tests passed|tests failed|\*\*\*|Skipped|Failed|skip"); then
		:
	fi
	grep -q "100% tests passed" "$log" || { echo "$name: FAILED"; exit 1; }
	summary+=("$name: $(grep -E 'tests passed' "$log")")
}

mkdir -p build-ci
run_suite "release (CUDA $cuda)" build-ci/release -DCMAKE_BUILD_TYPE=Release -DMOE_CUDA=$cuda
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	run_suite "asan+ubsan" build-ci/asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_SANITIZE=ON \
	-DMOE_CUDA=OFF

echo "== fuzzing (${MOE_FUZZ_SECONDS:-12}s per target, 6 targets: 72 s in all)"
tools/fuzz.sh "${MOE_FUZZ_SECONDS:-12}"

echo
echo "== summary"
for s in "${summary[@]}"; do echo "$s"; done
echo "CPU kernel paths (each supported path runs the kernel and engine suites):"
echo "  CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
# (from the release run's log: the suites print which paths ran)
grep -hE "(panel|pairs) kernels: |^engine \(.* kernels\): " \
	build-ci/release/Testing/Temporary/LastTest.log | sort -u | sed 's/^/  /' || true
if [ "$cuda" = ON ]; then
	echo "CUDA: backend compiled and linked; GPU tests (ctest label gpu):"
	build-ci/release/tests/test_cuda 2>&1 | grep -E "SKIPPED|PASSED|FAILED" | sed 's/^/  /' ||
		true
else
	echo "CUDA: not compiled (no nvcc found)."
fi
echo "Python client (ctest 'python', Release): binding and end-to-end runs:"
grep -hE "^(test_[a-z0-9_]+ \(test_|[a-z0-9_]+: f32 tokens identical|Ran [0-9]+ tests|OK|FAILED)" \
	build-ci/release/Testing/Temporary/LastTest.log 2>/dev/null | sed 's/^/  /' ||
	echo "  (no output: the python test did not run)"
grep -h "(Skipped)" build-ci/*.ctest.log 2>/dev/null | sed 's/^/skipped test: /' ||
	echo "skipped ctest tests: none"
