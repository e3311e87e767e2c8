#!/usr/bin/env bash
# tools/gpu-check.sh — build and test moed on a bare GPU machine in one call.
#
# The lent GPU machines have nvcc, cuBLAS, NCCL and CMake but cannot install
# anything and lack libyaml, cJSON, cmocka, libsystemd and pkg-config. So:
#
#   tools/gpu-check.sh --prepare     (here, with apt): fetch those Debian
#       packages with `apt-get download`, unpack them into .gpu-deps/root,
#       make their .pc files relocatable. .gpu-deps/ is git-ignored: name it
#       in the device tool's `carry`.
#   tools/gpu-check.sh [test|bench|all] [OUTDIR]   (there): build Release
#       with CUDA for sm_90 against .gpu-deps/root (incremental: build-gpu/
#       stays on a warm machine), print the GPU, then
#         test   the GPU tests (ctest -L gpu), then the whole suite
#         bench  moe-bench --device cuda (all three expert paths) and the
#                PyTorch comparison on the GPU
#         all    both (the default; may not fit one 10-minute call when the
#                synthetic Mixtral layer must be written first)
#       logs go to OUTDIR (default $OUT, else ./gpu-check-out).
#
# Typical device calls: carry [".gpu-deps"], command "tools/gpu-check.sh
# test", then "tools/gpu-check.sh bench".
set -euo pipefail
cd "$(dirname "$0")/.."
deps=$PWD/.gpu-deps
root=$deps/root
pkgs=(libcjson1 libcjson-dev libyaml-0-2 libyaml-dev libcmocka0 libcmocka-dev
	libsystemd0 libsystemd-dev pkgconf pkgconf-bin libpkgconf3)

prepare() {
	command -v apt-get >/dev/null || { echo "--prepare needs apt-get" >&2; exit 1; }
	rm -rf "$deps"
	mkdir -p "$deps/debs" "$root"
	(cd "$deps/debs" && apt-get download "${pkgs[@]}" >/dev/null)
	for d in "$deps"/debs/*.deb; do
		dpkg-deb -x "$d" "$root"
	done
	# absolute /usr paths -> relative to the .pc file (pkgconf's
	# ${pcfiledir}), so the unpacked tree works wherever it is carried
	find "$root" -name '*.pc' -print0 | while IFS= read -r -d '' pc; do
		rel=$(realpath --relative-to="$(dirname "$pc")" "$root/usr")
		sed -i -E "s#^([a-z_]+)=/usr(/|\$)#\1=\\\${pcfiledir}/$rel\2#" "$pc"
	done
	rm -rf "$deps/debs"
	echo "prepared $(du -sh "$deps" | cut -f1) in $deps; carry it: [\".gpu-deps\"]"
}

if [ "${1:-}" = "--prepare" ]; then
	prepare
	exit 0
fi

stage=all
case "${1:-}" in test | bench | all) stage=$1; shift ;; esac
out=${1:-${OUT:-$PWD/gpu-check-out}}
mkdir -p "$out"
[ -d "$root" ] || { echo "no $root: run tools/gpu-check.sh --prepare here first" >&2; exit 1; }
libdir=$root/usr/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PKG_CONFIG_PATH=$libdir/pkgconfig:$root/usr/share/pkgconfig
export PKG_CONFIG_LIBDIR=$PKG_CONFIG_PATH # only what was carried
export PKG_CONFIG_EXECUTABLE=$root/usr/bin/pkgconf
export PATH=$root/usr/bin:/usr/local/cuda/bin:$PATH
export CPATH=$root/usr/include${CPATH:+:$CPATH}
export LIBRARY_PATH=$libdir${LIBRARY_PATH:+:$LIBRARY_PATH}

{
	echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
	nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ||
		echo "nvidia-smi: no GPU visible"
	nvcc --version | tail -1
} 2>&1 | tee "$out/gpu-info.txt"

build=build-gpu
cmake -S . -B $build -DCMAKE_BUILD_TYPE=Release -DMOE_CUDA=ON -DMOE_WERROR=ON \
	-DCMAKE_CUDA_ARCHITECTURES="90-real;80-virtual" \
	-DPKG_CONFIG_EXECUTABLE="$PKG_CONFIG_EXECUTABLE" >"$out/configure.log" 2>&1 ||
	{ tail -40 "$out/configure.log"; exit 1; }
cmake --build $build -j"$(nproc)" >"$out/build.log" 2>&1 || { tail -60 "$out/build.log"; exit 1; }
echo "== build ok"

status=0
if [ $stage != bench ]; then
	echo "== GPU tests (ctest -L gpu, verbose log in gpu-tests.log)"
	(cd $build && ctest -L gpu -V >"$out/gpu-tests.log" 2>&1) || status=1
	grep -E "SKIPPED|\[  (PASSED|FAILED|ERROR) |^ *[0-9]+/[0-9]+ Test|tests passed|tests failed" \
		"$out/gpu-tests.log" | tail -30 || true
	echo "== the whole suite"
	(cd $build && ctest --output-on-failure -j4 >"$out/ctest.log" 2>&1) || status=1
	grep -E "tests passed|tests failed|\(Failed\)|\(Skipped\)" "$out/ctest.log" || true
fi
if [ $stage = test ]; then
	exit $status
fi

echo "== moe-bench --device cuda (Mixtral- and OLMoE-shaped layers)"
./$build/bin/moe-bench --device cuda 2>&1 | tee "$out/moe-bench-cuda.txt" || status=1
echo "== each way of running the experts (MOE_CUDA_GEMM), every size"
for g in cublas grouped small; do
	MOE_CUDA_GEMM=$g ./$build/bin/moe-bench --device cuda --tokens 1,4,16,64,256,1024,4096 2>&1 |
		tee -a "$out/moe-bench-cuda-gemm.txt" || status=1
done
echo "== the same layers through PyTorch on the GPU (transformers' block, torch._grouped_mm)"
if python3 -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null; then
	for d in "${MOE_BENCH_CACHE:-/tmp}"/moe-bench-mixtral-* "${MOE_BENCH_CACHE:-/tmp}"/moe-bench-olmoe-*; do
		[ -f "$d/model.safetensors" ] || continue
		python3 bench/compare_torch.py --device cuda --model "$d" \
			--moe-bench ./$build/bin/moe-bench 2>&1 | tee -a "$out/compare-torch-cuda.txt" ||
			status=1
	done
else
	echo "no torch with CUDA here: skipped"
fi
echo "== moe-bench (CPU engine on this host, for reference)"
./$build/bin/moe-bench --tokens 1,16,256 2>&1 | tee "$out/moe-bench-cpu.txt" | tail -5
exit $status
