#!/usr/bin/env bash
# bench/serving_core.sh BEFORE_BUILD AFTER_BUILD [ROUNDS]
#
# Two builds of moed, measured in the same run on the same machine,
# alternating (before, after, before, after, ...) so that drift in the
# machine's load hits both alike:
#
#   moe-bench ipc        each build's own (it starts its own moed): round
#                        trips and 1/4/16-client 1-token throughput;
#   moe-load             each build's own moed + moe-load on the fixture
#                        qwen2_moe_bf16 and on a synthetic Mixtral-shaped
#                        layer pair (hidden 1024, 8 experts, top-2, bf16;
#                        weights 96 MiB: larger than the last-level cache),
#                        4 and 16 client processes, mixed sizes (1..256
#                        tokens, 3/4 of them <= 16), every output checked
#                        bit for bit against the in-process engine.
#
# BEFORE_BUILD / AFTER_BUILD: build directories (bin/moed, bin/moe-load,
# bin/moe-bench, bin/moe-mkmodel in each). Prints one line per run and a
# summary (median over the rounds) per configuration.
set -u
before=${1:?usage: bench/serving_core.sh BEFORE_BUILD AFTER_BUILD [ROUNDS]}
after=${2:?usage: bench/serving_core.sh BEFORE_BUILD AFTER_BUILD [ROUNDS]}
rounds=${3:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
fixture=$here/tests/fixtures/qwen2_moe_bf16
tmp=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null; rm -rf "$tmp"' EXIT

"$after/bin/moe-mkmodel" --family mixtral --hidden 1024 --inter 1536 --experts 8 --top-k 2 \
	--layers 2 --dtype bf16 --out "$tmp/mixtral" >/dev/null ||
	{ echo "cannot write the synthetic model"; exit 1; }

echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) CPUs"
echo "# before: $before; after: $after (source tree at $(git -C "$here" rev-parse --short HEAD 2>/dev/null))"

# moe-load against a fresh moed of build $1 on model $2 with $3 clients
# and $4 requests each; prints "requests/s p50 p99".
load() {
	local b=$1 model=$2 clients=$3 reqs=$4 sock=$tmp/moed.sock out pid
	rm -f "$sock"
	"$b/bin/moed" --model "$model" --socket "$sock" 2>"$tmp/moed.log" &
	pid=$!
	for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
	out=$("$b/bin/moe-load" --socket "$sock" --model "$model" --clients "$clients" \
		--requests "$reqs" --max-tokens 256 --seed 11 2>&1)
	local rc=$?
	kill -TERM $pid
	wait $pid 2>/dev/null
	[ $rc = 0 ] || { echo "moe-load failed: $out" >&2; echo "0 0 0"; return; }
	# "...; 1801 requests/s, 123464 tokens/s; latency p50 1.14 ms, p99 6.66 ms, ..."
	sed -n 's/.* \([0-9.]*\) requests\/s.*p50 \([0-9.]*\) ms, p99 \([0-9.]*\) ms.*/\1 \2 \3/p' \
		<<<"$out" | tail -1
}

ipc() { # 16-client 1-token requests/s and the no-op p50 of build $1
	"$1/bin/moe-bench" ipc --count 5000 2>/dev/null | awk '
		/no-op request through moed/ {noop = $(NF-2)}
		/^1-token forward through moed/ {fwd = $(NF-2)}
		/^16 / {c16 = $2} /^4 / {c4 = $2}
		END {print noop, fwd, c4, c16}'
}

declare -A res
for r in $(seq "$rounds"); do
	for which in before after; do
		b=$before; [ $which = after ] && b=$after
		res[$which,ipc,$r]=$(ipc "$b")
		echo "round $r $which ipc (no-op p50 us, 1-token p50 us, 4 and 16 clients req/s): ${res[$which,ipc,$r]}"
		for m in fixture mixtral; do
			model=$fixture; [ $m = mixtral ] && model=$tmp/mixtral
			for c in 4 16; do
				n=$((c == 4 ? 1500 : 400)); [ $m = mixtral ] && n=$((n / 3))
				res[$which,$m,$c,$r]=$(load "$b" "$model" $c $n)
				echo "round $r $which $m $c clients x $n (req/s p50 p99 ms): ${res[$which,$m,$c,$r]}"
			done
		done
	done
done

median() { sort -n | awk '{v[NR] = $1} END {print NR ? v[int((NR + 1) / 2)] : 0}'; }
col() { # which key field -> median over rounds
	for r in $(seq "$rounds"); do echo "${res[$1,$r]}" | awk -v f=$2 '{print $f}'; done | median
}
echo
echo "median of $rounds rounds          before      after"
for k in "ipc 1 no-op p50 us" "ipc 2 1-token p50 us" "ipc 3 4 clients req/s" "ipc 4 16 clients req/s"; do
	set -- $k
	printf "%-30s %10s %10s\n" "ipc ${*:3}" "$(col before,$1 $2)" "$(col after,$1 $2)"
done
for m in fixture mixtral; do
	for c in 4 16; do
		printf "%-30s %10s %10s\n" "$m $c clients req/s" "$(col before,$m,$c 1)" "$(col after,$m,$c 1)"
		printf "%-30s %10s %10s\n" "$m $c clients p50 ms" "$(col before,$m,$c 2)" "$(col after,$m,$c 2)"
		printf "%-30s %10s %10s\n" "$m $c clients p99 ms" "$(col before,$m,$c 3)" "$(col after,$m,$c 3)"
	done
done
