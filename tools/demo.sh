#!/usr/bin/env bash
# tools/demo.sh — the main job on the embedded default (CPU backend):
# build, make the demo model (a synthetic Qwen2-MoE-shaped checkpoint,
# ~400 MB of bf16 expert weights, written once into demo-model/), check it
# with `moed -t`, then run the engine on it and report tokens/s and the
# expert load. With the daemon data path this becomes: start moed, drive
# it with concurrent clients, show `moectl status`.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/deps.sh build
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DMOE_TESTS=OFF >build.configure.log 2>&1 ||
	{ cat build.configure.log; exit 1; }
cmake --build build -j"$(nproc)" >build.log 2>&1 || { tail -40 build.log; exit 1; }

model=demo-model
if [ ! -f $model/config.json ]; then
	./build/bin/moe-mkmodel --family qwen2_moe --out $model --hidden 1024 --inter 512 \
		--shared-inter 2048 --experts 32 --top-k 4 --layers 4 --dtype bf16 --skew 1 --seed 7
fi
echo
echo "== moed -t: the plan for this model"
./build/bin/moed -t --model $model
echo
echo "== the engine on the demo model"
./build/bin/moe-demo $model
