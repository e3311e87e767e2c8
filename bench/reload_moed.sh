#!/usr/bin/env bash
# bench/reload_moed.sh — serving during a rolling weight reload, through
# moed itself: an OLMoE-shaped synthetic model (bf16, hidden 512, inter
# 256, 32 experts top-4, 4 MoE layers: 25 MiB of experts per layer) served
# on the CPU backend; 4 client processes (moe-load, up to 16 tokens per
# request) measure throughput and latency in steady state, then the same
# traffic again while `moectl reload` rolls in a second checkpoint of the
# same architecture, layer by layer, its staging throttled by
# reload.bytes_per_s so that the reload lasts longer than the measured
# run (every request of the second run overlaps it, and layers switch
# during it). One run prints both,
# their ratios, and the reload's own figures.
# Usage: bench/reload_moed.sh [BUILD_DIR] [REQUESTS_PER_CLIENT]
set -euo pipefail
cd "$(dirname "$0")/.."
b=${1:-build}/bin
n=${2:-800}
tmp=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
pid=
for s in 1 2; do
	$b/moe-mkmodel --family olmoe --out "$tmp/m$s" --hidden 512 --inter 256 --experts 32 \
		--top-k 4 --layers 4 --dtype bf16 --seed $s >/dev/null
done
sock=$tmp/moed.sock
cat >"$tmp/moe.yaml" <<YAML
model:
  path: $tmp/m1
devices: cpu
reload:
  bytes_per_s: ${MOE_RELOAD_BPS:-24M}
server:
  socket: $sock
YAML
$b/moed -c "$tmp/moe.yaml" 2>"$tmp/moed.log" &
pid=$!
for _ in $(seq 300); do [ -S "$sock" ] && break; sleep 0.1; done
load() { $b/moe-load --socket "$sock" --clients 4 --requests "$n" --max-tokens 16 --no-check; }
load >/dev/null # warm up
steady=$(load)
echo "steady state:   $steady"
t0=$(date +%s.%N)
$b/moectl -s "$sock" reload --model "$tmp/m2" --wait >"$tmp/reload.log" 2>&1 &
rp=$!
sleep 0.3
during=$(load)
t1=$(date +%s.%N)
running=$($b/moectl -s "$sock" status --json | python3 -c \
	'import json,sys; w=json.load(sys.stdin)["weights"]; r=w.get("reload"); print("yes, %d of %d layers switched" % (r["steps_done"], r["steps_total"]) if r else "no")')
wait $rp
echo "during reload:  $during"
echo "reload:         $(tail -1 "$tmp/reload.log")"
echo "the reload was still running when the measured run ended: $running" \
	"(run: $(python3 -c "print('%.2f s' % ($t1 - $t0 - 0.3))"))"
python3 - "$steady" "$during" <<'PY'
import re, sys
def figs(s):
    rps = float(re.search(r"([0-9.]+) requests/s", s).group(1))
    p99 = float(re.search(r"p99 ([0-9.]+) ms", s).group(1))
    ok = re.search(r"(\d+) ok, (\d+) failed", s)
    return rps, p99, int(ok.group(1)), int(ok.group(2))
a, b = figs(sys.argv[1]), figs(sys.argv[2])
print("during/steady: throughput %.1f %%, p99 %.2fx; %d requests overlapped the reload, "
      "%d failed" % (100 * b[0] / a[0], b[1] / a[1], b[2], b[3]))
PY
$b/moectl -s "$sock" status | grep -A2 '^weights'
kill -TERM $pid
wait $pid
pid=
