#!/usr/bin/env bash
# tests/daemon_load_test.sh BIN_DIR FIXTURES_DIR [REQUESTS_PER_CLIENT]
#
# A real moed on a fixture model; 4 concurrent client processes (moe-load)
# send random requests (1..512 tokens, every MoE layer, f32 and bf16) and
# check every output against their own in-process engine, bit for bit.
# Then: no request lost, the daemon's open fds back to where they were, its
# RSS growth under a threshold, `moectl status --json` carrying the
# documented keys, `moectl ping`, and a clean SIGTERM exit.
set -u
bin=$1 fix=$2 per_client=${3:-${MOE_LOAD_REQUESTS:-250}}
model=$fix/qwen2_moe_bf16
tmp=$(mktemp -d)
sock=$tmp/moed.sock
fail=0
trap 'kill -9 $pid 2>/dev/null; rm -rf "$tmp"' EXIT

"$bin/moed" --model "$model" --socket "$sock" 2>"$tmp/moed.log" &
pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "FAIL: moed did not start"; cat "$tmp/moed.log"; exit 1; }

fds() { ls /proc/$pid/fd | wc -l; }
rss() { awk '/VmRSS/ {print $2}' /proc/$pid/status; }

# warm-up: the first connections size the daemon's buffers
"$bin/moe-load" --socket "$sock" --model "$model" --clients 2 --requests 20 --max-tokens 512 \
	>/dev/null || { echo "FAIL: warm-up"; fail=1; }
fd0=$(fds) rss0=$(rss)

echo "moe-load: 4 clients x $per_client requests"
if ! "$bin/moe-load" --socket "$sock" --model "$model" --clients 4 --requests "$per_client" \
	--max-tokens 512 --seed 7; then
	echo "FAIL: moe-load reported lost, failed or differing requests"
	fail=1
fi
fd1=$(fds) rss1=$(rss)
echo "daemon fds: $fd0 -> $fd1; RSS: $rss0 -> $rss1 KiB"
[ "$fd0" = "$fd1" ] || { echo "FAIL: file descriptors leaked"; fail=1; }
# Threshold: 64 MiB over the warm-up (the daemon keeps no per-request
# state; ASan's quarantine alone can hold more, so only Release checks it).
if [ -z "${MOE_ASAN:-}" ] && [ $((rss1 - rss0)) -gt 65536 ]; then
	echo "FAIL: RSS grew by $((rss1 - rss0)) KiB"
	fail=1
fi

json=$("$bin/moectl" -s "$sock" status --json) || { echo "FAIL: moectl status"; fail=1; }
for key in '"version"' '"uptime_s"' '"state"' '"model"' '"family"' '"backend"' '"kernels"' \
	'"clients"' '"queue"' '"pending_requests"' '"requests"' '"completed"' '"layers"' \
	'"expert_tokens"'; do
	grep -q "$key" <<<"$json" || { echo "FAIL: status JSON lacks $key"; fail=1; }
done
"$bin/moectl" -s "$sock" status >/dev/null || { echo "FAIL: moectl status (table)"; fail=1; }
"$bin/moectl" -s "$sock" ping -c 20 || { echo "FAIL: moectl ping"; fail=1; }
"$bin/moectl" -s "$tmp/nothing.sock" ping >/dev/null 2>&1
[ $? = 3 ] || { echo "FAIL: moectl on a dead socket must exit 3"; fail=1; }

kill -TERM $pid
wait $pid
rc=$?
[ $rc = 0 ] || { echo "FAIL: moed exited $rc on SIGTERM"; fail=1; }
if [ $fail != 0 ]; then
	echo "--- moed log"
	tail -30 "$tmp/moed.log"
fi
[ $fail = 0 ] && echo "1 passed, 0 failed" || echo "0 passed, 1 failed"
exit $fail
