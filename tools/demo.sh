#!/usr/bin/env bash
# tools/demo.sh — the main job on the embedded default (CPU backend):
# build; make the demo model (a synthetic Qwen2-MoE-shaped checkpoint,
# 384 MiB of bf16 expert weights, written once into demo-model/); check it
# with `moed -t`; start moed on a temporary socket; drive it with 4
# concurrent client processes (moe-load: mixed sizes and dtypes, every
# output checked bit for bit against an in-process engine); show
# `moectl status`; rebalance while serving; roll in the weights of a second
# checkpoint of the same architecture (demo-model-b) layer by layer while
# serving, and roll them back; stop the daemon with SIGTERM.
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
# the same architecture, other weights: what a fine-tuned update looks like
if [ ! -f $model-b/config.json ]; then
	./build/bin/moe-mkmodel --family qwen2_moe --out $model-b --hidden 1024 --inter 512 \
		--shared-inter 2048 --experts 32 --top-k 4 --layers 4 --dtype bf16 --skew 1 --seed 8
fi
tmp=$(mktemp -d)
sock=$tmp/moed.sock
# two CPU ranks (as a host with two GPUs has two), room for replicas, and a
# short load window so that the effect of a rebalance shows at once
cat >"$tmp/moe.yaml" <<EOF
model:
  path: $PWD/$model
devices: cpu:2
placement:
  spare_slots: 2
  stats_window_s: 5
reload:
  bytes_per_s: 256M
server:
  socket: $sock
EOF
echo
echo "== moed -t: the plan for this model on 2 CPU ranks"
./build/bin/moed -t -c "$tmp/moe.yaml"

./build/bin/moed -c "$tmp/moe.yaml" 2>"$tmp/moed.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
for _ in $(seq 300); do [ -S "$sock" ] && break; sleep 0.1; done
echo
echo "== moed serving on $sock (pid $pid); 4 clients, mixed sizes, outputs checked"
echo "   bit for bit against an in-process single-rank engine"
./build/bin/moe-load --socket "$sock" --model $model --clients 4 --requests 150 \
	--max-tokens 256
echo
echo "== throughput: the same load without the clients' own reference engines"
./build/bin/moe-load --socket "$sock" --clients 4 --requests 300 --max-tokens 256 --no-check
echo
echo "== the skewed router loads the ranks unevenly (load over the last 5 s)"
./build/bin/moectl -s "$sock" placement --layer 0
echo
echo "== moectl rebalance --dry-run: the plan"
./build/bin/moectl -s "$sock" rebalance --dry-run
echo
echo "== moectl rebalance, while 4 clients keep sending (outputs checked)"
./build/bin/moe-load --socket "$sock" --model $model --clients 4 --requests 100 \
	--max-tokens 256 >"$tmp/during.log" 2>&1 &
load=$!
sleep 1
./build/bin/moectl -s "$sock" rebalance --wait
wait $load
cat "$tmp/during.log"
sleep 5 # a fresh window
echo
echo "== after: the same load, the ranks even"
./build/bin/moe-load --socket "$sock" --clients 4 --requests 300 --max-tokens 256 --no-check
./build/bin/moectl -s "$sock" placement --layer 0
echo
echo "== rolling reload: demo-model-b's weights, layer by layer, while 4 clients keep"
echo "   sending (staging paced at reload.bytes_per_s = 256M)"
./build/bin/moectl -s "$sock" status | grep -A1 '^weights'
./build/bin/moe-load --socket "$sock" --clients 4 --requests 400 --max-tokens 64 --no-check \
	>"$tmp/during.log" 2>&1 &
load=$!
sleep 0.3
./build/bin/moectl -s "$sock" reload --model $model-b --wait
wait $load
cat "$tmp/during.log"
./build/bin/moectl -s "$sock" status | grep -A3 '^weights'
echo
echo "== moectl reload --rollback: back to demo-model's weights (kept in memory), then"
echo "   every output checked against an in-process engine on demo-model"
./build/bin/moectl -s "$sock" reload --rollback --wait
./build/bin/moe-load --socket "$sock" --model $model --clients 4 --requests 50 \
	--max-tokens 64
echo
echo "== moectl status"
./build/bin/moectl -s "$sock" status
echo
echo "== moectl ping"
./build/bin/moectl -s "$sock" ping -c 50
kill -TERM $pid
wait $pid && echo "moed stopped cleanly" || echo "moed exited with $?"
echo "--- moed log"
cat "$tmp/moed.log"
