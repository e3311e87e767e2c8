#!/usr/bin/env bash
# tools/gpu-check.sh — build, test and benchmark moed on a bare GPU machine
# in one call of about 7 minutes.
#
# The lent GPU machines have nvcc, cuBLAS, CMake, torch and transformers but
# cannot install anything and lack libyaml, cJSON, cmocka, libsystemd and
# pkg-config. So:
#
#   tools/gpu-check.sh --prepare     (here, with apt): fetch those Debian
#       packages with `apt-get download`, unpack them into .gpu-deps/root,
#       make their .pc files relocatable. .gpu-deps/ is git-ignored: name it
#       in the device tool's `carry`.
#   tools/gpu-check.sh [STAGES] [OUTDIR]   (there): STAGES is a comma list of
#         build   Release, CUDA for sm_90 only, -j$(nproc), against .gpu-deps
#         test    the GPU tests (ctest -L gpu), graphs on (the default)
#         bench   moe-bench --device cuda, Mixtral- and OLMoE-shaped layers:
#                 auto, then each expert path (MOE_CUDA_GEMM), then small
#                 batches without graphs (MOE_CUDA_GRAPHS=0) and with the
#                 fused front (MOE_CUDA_FUSED=1)
#         torch   bench/compare_torch.py --device cuda on the same layers
#                 (transformers' block, torch._grouped_mm)
#         nograph the GPU tests again with MOE_CUDA_GRAPHS=0 MOE_CUDA_FUSED=1
#         ncu     per-kernel device times (Nsight Compute) of the OLMoE-shaped
#                 layer at 1, 16 and 4096 tokens, where ncu can read counters
#       default: build,test,nograph,bench,torch,ncu. Each stage runs under its
#       own `timeout` and appends to a few logs in OUTDIR (default $OUT, else
#       ./gpu-check-out) as it goes, so a call that runs out of time still
#       returns what ran. Without a GPU the GPU stages stop with "no GPU".
#
# Device call: carry [".gpu-deps"], command "tools/gpu-check.sh",
# timeout_s 540.
set -uo pipefail
cd "$(dirname "$0")/.."
deps=$PWD/.gpu-deps
root=$deps/root
pkgs=(libcjson1 libcjson-dev libyaml-0-2 libyaml-dev libcmocka0 libcmocka-dev
	libsystemd0 libsystemd-dev pkgconf pkgconf-bin libpkgconf3)

prepare() {
	set -e
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

stages=build,test,nograph,bench,torch,ncu
case "${1:-}" in [a-z]*) stages=$1; shift ;; esac
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
export MOE_BENCH_CACHE=${MOE_BENCH_CACHE:-/tmp}
export PYTHONUNBUFFERED=1

build=build-gpu
bin=$PWD/$build/bin
log=$out/summary.log # everything short; the long logs beside it
t_start=$(date +%s)
say() { echo "== [$(($(date +%s) - t_start))s] $*" | tee -a "$log"; }
has() { case ",$stages," in *",$1,"*) return 0 ;; esac; return 1; }
gpu=1
status=0

{
	# (the device tool's copy of the tree carries the session's first
	# .git: its commit is the base, and what was sent shows as changes)
	echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
		"$(git status --porcelain 2>/dev/null | grep -q . && echo '(+ uncommitted changes)')"
	nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
		--format=csv,noheader || echo "nvidia-smi: no GPU visible"
	nvcc --version | tail -1
	echo "host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
	python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1
} 2>&1 | tee -a "$log"
nvidia-smi -L >/dev/null 2>&1 || gpu=0

if has build; then
	say "build (Release, CUDA sm_90, -j$(nproc))"
	{
		timeout 240 cmake -S . -B $build -DCMAKE_BUILD_TYPE=Release -DMOE_CUDA=ON \
			-DMOE_WERROR=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DCMAKE_CUDA_FLAGS=-Xptxas=-v \
			-DPKG_CONFIG_EXECUTABLE="$PKG_CONFIG_EXECUTABLE" &&
			timeout 120 cmake --build $build -j"$(nproc)" --target moe-mkmodel
	} >"$out/build.log" 2>&1 || { tail -40 "$out/build.log" | tee -a "$log"; say "BUILD FAILED"; exit 1; }
	# The benchmark's synthetic layers (what moe-bench --device cuda would
	# write on first use, same options), written while the rest builds and
	# the tests run: about a minute of one core.
	if has bench && [ $gpu = 1 ]; then
		synth() { # shape family hidden inter experts top-k
			local d=$MOE_BENCH_CACHE/moe-bench-$1-$3x$4x$5x$6-bf16
			[ -f "$d/model.safetensors" ] && return 0
			"$bin/moe-mkmodel" --family "$2" --hidden "$3" --inter "$4" --experts "$5" \
				--top-k "$6" --layers 1 --dtype bf16 --seed 2026 --out "$d.tmp" &&
				mv "$d.tmp" "$d"
		}
		synth mixtral mixtral 4096 14336 8 2 >>"$out/build.log" 2>&1 &
		synth olmoe olmoe 2048 1024 64 8 >>"$out/build.log" 2>&1 &
	fi
	timeout 240 cmake --build $build -j"$(nproc)" >>"$out/build.log" 2>&1 ||
		{ tail -40 "$out/build.log" | tee -a "$log"; say "BUILD FAILED"; exit 1; }
	say "build ok"
fi
if [ $gpu = 0 ]; then
	say "no GPU: nvidia-smi sees none; the GPU stages are not run"
	exit 1
fi

gpu_tests() { # tag env...
	local tag=$1
	shift
	say "GPU tests ($tag): ctest -L gpu"
	(cd $build && env "$@" timeout 150 ctest -L gpu -V) >>"$out/tests.log" 2>&1 || status=1
	grep -E "SKIPPED|\[  (PASSED|FAILED|ERROR) |\[ +OK +\]|^ *[0-9]+/[0-9]+ Test|tests passed|tests failed|printed|MiB|within" \
		"$out/tests.log" | tail -60 >>"$log"
	tail -3 "$out/tests.log" | tee -a "$log"
}
has test && gpu_tests "defaults: graphs, fused front"
has nograph && gpu_tests "MOE_CUDA_GRAPHS=0 MOE_CUDA_FUSED=1" MOE_CUDA_GRAPHS=0 MOE_CUDA_FUSED=1

bench() { # tag tokens env... : both shapes
	local tag=$1 tokens=$2
	shift 2
	say "moe-bench --device cuda ($tag)"
	echo "### $tag" >>"$out/bench.log"
	env "$@" timeout 120 "$bin/moe-bench" --device cuda --tokens "$tokens" >>"$out/bench.log" 2>&1 || {
		status=1
		echo "moe-bench failed ($tag)" | tee -a "$log"
	}
	grep -vE '^\{' "$out/bench.log" | awk -v t="### $tag" '$0==t{p=1;next} /^### /{p=0} p' >>"$log"
}
if has bench; then
	say "waiting for the synthetic layers"
	wait
	all=1,16,64,256,1024,4096
	bench "auto (the default)" 1,2,4,8,16,32,64,256,1024,4096
	bench "cublas" $all MOE_CUDA_GEMM=cublas
	bench "grouped" $all MOE_CUDA_GEMM=grouped
	bench "small" $all MOE_CUDA_GEMM=small
	bench "small, no graphs" 1,4,16,64 MOE_CUDA_GEMM=small MOE_CUDA_GRAPHS=0
	bench "small, graphs, fused front" 1,4,16,64 MOE_CUDA_GEMM=small MOE_CUDA_FUSED=1
fi

if has torch; then
	say "PyTorch on the same layers (transformers' block, torch._grouped_mm)"
	for d in "$MOE_BENCH_CACHE"/moe-bench-mixtral-* "$MOE_BENCH_CACHE"/moe-bench-olmoe-*; do
		[ -f "$d/model.safetensors" ] || continue
		timeout 150 python3 bench/compare_torch.py --device cuda --model "$d" \
			>>"$out/torch.log" 2>&1 || { status=1; echo "compare_torch failed on $d" >>"$log"; }
	done
	grep -vE '^\{' "$out/torch.log" >>"$log"
fi

if has ncu; then
	ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
	if [ -n "$ncu" ]; then
		for nt in ${MOE_NCU_TOKENS:-1 16 4096}; do
			say "ncu: OLMoE-shaped layer, $nt tokens, auto (per-kernel device time)"
			timeout 60 "$ncu" --clock-control none --metrics gpu__time_duration.sum \
				--launch-skip 150 --launch-count 40 --print-summary per-kernel \
				"$bin/moe-bench" --device cuda --shape olmoe --tokens $nt >>"$out/ncu.log" 2>&1 ||
				echo "ncu failed (exit $?)" >>"$log"
			grep -E "^  [a-zA-Z_].*\(|gpu__time_duration.sum" "$out/ncu.log" | tail -40 >>"$log"
		done
	else
		say "ncu: not found"
	fi
fi

say "done, status $status"
exit $status
