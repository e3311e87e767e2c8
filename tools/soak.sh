#!/usr/bin/env bash
# tools/soak.sh [SECONDS] — moed under well-behaved and hostile clients at
# once, for SECONDS (default 600). Not in CI: ten minutes of a machine.
#
#   - moed (Release build in build/) on the qwen2_moe_bf16 fixture, with
#     the adversarial suite's limits (small queue, 2 GiB of client memory);
#   - 16 moe-load client processes, round after round (each request's output
#     checked bit for bit against an in-process engine);
#   - tests/test_hostile --attack: every case that leaves moed serving
#     (empty datagrams with fds, a hugetlbfs region, queue and STATUS floods,
#     regions past the cap, malformed entries, lying rings, region edges,
#     churn, CANCEL floods), in a loop, each checking moed's fds and RSS;
#   - moed's fds and RSS sampled every 10 s.
#
# Prints the well-behaved clients' totals (requests, wrong answers,
# failures), the attack rounds, and moed's fds and RSS first / last / max.
# Exits non-zero if a well-behaved request failed or differed, an attack
# round failed, or moed died.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
build=${BUILD:-build}
tools/deps.sh test
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)" --target moed moe-load test_hostile >/dev/null
fixture=$PWD/tests/fixtures/qwen2_moe_bf16
dir=$(mktemp -d /tmp/moed-soak-XXXXXX)
sock=$dir/moed.sock
cat >"$dir/moe.yaml" <<EOF
model:
  path: $fixture
scheduler:
  max_queue_requests: 64
server:
  socket: $sock
  max_clients: 128
  handshake_timeout_ms: 2000
  max_total_shm_bytes: 2G
EOF
"$build/bin/moed" -c "$dir/moe.yaml" 2>"$dir/moed.log" &
moed=$!
trap 'kill $moed 2>/dev/null || true; kill $(jobs -p) 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat "$dir/moed.log"; echo "soak: moed did not start"; exit 1; }

end=$(($(date +%s) + secs))
sample() {
	while kill -0 $moed 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do
		echo "$(date +%s) $(ls /proc/$moed/fd | wc -l) $(awk '/VmRSS/{print $2}' /proc/$moed/status)"
		sleep 10
	done >"$dir/samples"
}
sample &
sampler=$!
(
	rounds=0
	while [ "$(date +%s)" -lt "$end" ]; do
		"$build/bin/moe-load" --socket "$sock" --model "$fixture" --clients 16 \
			--requests 400 --max-tokens 16 --seed $rounds >>"$dir/load.log" 2>&1 ||
			echo "ROUND $rounds FAILED" >>"$dir/load.log"
		rounds=$((rounds + 1))
	done
	echo "load rounds: $rounds" >>"$dir/load.log"
) &
load=$!
sleep 5 # the well-behaved clients are in
attack_status=0
"$build/tests/test_hostile" --attack "$sock" $moed $((end - $(date +%s))) >"$dir/attack.log" 2>&1 ||
	attack_status=$?
wait $load || true
wait $sampler || true
alive=yes
kill -0 $moed 2>/dev/null || alive=no
kill -TERM $moed 2>/dev/null || true
wait $moed 2>/dev/null && moed_exit=0 || moed_exit=$?

echo "== soak: ${secs}s, moed on $fixture (logs in $dir)"
awk '/^moe-load:/{r++; ok+=$7; bad+=$9; if (/OUTPUTS DIFFER/) d++}
	END{printf "well-behaved: %d moe-load rounds of 16 clients x 400 requests: %d answered right, %d failed, %d rounds with a differing output\n", r, ok, bad, d}' "$dir/load.log"
grep -E "^client [0-9]+:" "$dir/load.log" | head -5 || true
failed_rounds=$(grep -c "FAILED" "$dir/load.log" || true)
echo "hostile: $(grep -E '^attack:' "$dir/attack.log" || echo 'no summary') (exit $attack_status)"
awk 'NR==1{f0=$2;r0=$3} {if($2>fm)fm=$2; if($3>rm)rm=$3; f=$2; r=$3}
	END{printf "moed fds first %d last %d max %d; RSS first %d last %d max %d KiB (%d samples)\n",
		f0, f, fm, r0, r, rm, NR}' "$dir/samples"
echo "moed alive at the end: $alive; exit status after SIGTERM: $moed_exit"
[ "$failed_rounds" = 0 ] && [ "$attack_status" = 0 ] && [ "$alive" = yes ] && [ "$moed_exit" = 0 ]
