#!/usr/bin/env bash
# bench/rebalance_moed.sh — the rebalance figure through moed itself:
# a DeepSeek-V3-shaped synthetic model whose router picks its 64 experts
# with Zipf(1.0) frequencies (moe-mkmodel --zipf 1.0; popular experts
# scattered over a seeded order), served by moed on 4 CPU ranks with 2
# spare slots per rank and layer; 4 client processes (moe-load) send
# traffic; the rank load is measured over a fresh window before, the
# rebalance plan printed (moectl rebalance --dry-run), the rebalance done
# while the clients run, and the rank load measured again over a fresh
# window of the same traffic. Usage: bench/rebalance_moed.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
b=${1:-build}/bin
model=${MOE_ZIPF_MODEL:-/tmp/moe-zipf-model}
[ -f $model/config.json ] ||
	$b/moe-mkmodel --family deepseek_v3 --out $model --hidden 1024 --inter 512 \
		--experts 64 --top-k 4 --layers 2 --dtype bf16 --zipf 1.0 --seed 3
tmp=$(mktemp -d)
sock=$tmp/moed.sock
cat >"$tmp/moe.yaml" <<YAML
model:
  path: $model
devices: cpu:4
placement:
  spare_slots: 2
  stats_window_s: 6
server:
  socket: $sock
YAML
$b/moed -c "$tmp/moe.yaml" 2>"$tmp/moed.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
for _ in $(seq 300); do [ -S "$sock" ] && break; sleep 0.1; done
worst() { # the worst layer's rank max/mean over the window
	$b/moectl -s "$sock" placement --json |
		python3 -c 'import json,sys; print("%.3f" % max(l["imbalance"]["rank_max_over_mean"] for l in json.load(sys.stdin)["layers"]))'
}
load() { $b/moe-load --socket "$sock" --clients 4 --requests "$1" --max-tokens 64 --no-check; }
load 300 >/dev/null
sleep 6 # a fresh window
load 1500
echo "before: measured rank max/mean (worst layer, last 6 s): $(worst)"
$b/moectl -s "$sock" rebalance --dry-run
load 600 >"$tmp/during.log" &
lp=$!
sleep 0.5
$b/moectl -s "$sock" rebalance --wait
wait $lp
echo "during the move: $(cat "$tmp/during.log")"
sleep 6 # a fresh window of the same traffic
load 1500
echo "after: measured rank max/mean (worst layer, last 6 s): $(worst)"
$b/moectl -s "$sock" placement --layer 0
kill -TERM $pid
wait $pid
