#!/usr/bin/env bash
# bench/metrics_overhead.sh [BUILD_DIR] [REQUESTS] [ROUNDS] — what the metrics cost.
#
# 1. Instructions (valgrind --tool=callgrind: counts, not seconds, so the
#    figure is repeatable whatever else the machine does): moed on the
#    shipped demo model (MOE_BENCH_MODEL to change it), MOE_CPU_ISA=avx2
#    (valgrind has no AVX-512), cpu.threads 1 (no pool threads that spin:
#    valgrind serialises threads, so a spin loop would count as work), 4
#    clients (MOE_BENCH_CLIENTS) each sending REQUESTS requests of 1..16
#    tokens (MOE_BENCH_MAX_TOKENS), fixed seed. Instrumentation is switched
#    on after a warm-up and off before shutdown. Two runs: metrics.listen
#    empty (no endpoint: "metrics off") and metrics.listen 127.0.0.1:0
#    scraped every 100 ms during the load ("scraped"; curl --rate 10/s on
#    one kept-alive connection, as Prometheus does). Printed: instructions
#    per request of each and the difference; the endpoint thread's own
#    instructions (callgrind --separate-threads) per scrape and against the
#    rest; the inclusive instructions of the recording functions (which run
#    in both: moed records always, `moectl metrics` needs it).
#    Under valgrind moed runs ~50x slower, so a 100 ms cadence is ~50x more
#    scrapes per request than on the real CPU: the figure is an upper bound.
# 2. Wall clock, a secondary figure: the same daemon natively (default
#    kernels and threads), the same load, off and scraped interleaved
#    ROUNDS times; requests/s of each round, their mean and spread.
set -eu
build=${1:-build-rel}
reqs=${2:-400}
rounds=${3:-3}
clients=${MOE_BENCH_CLIENTS:-4}
maxt=${MOE_BENCH_MAX_TOKENS:-16}
src=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "$build/bin" && pwd)
model=${MOE_BENCH_MODEL:-$src/demo-model}
tmp=$(mktemp -d)
pid= spid=
trap 'kill -9 $pid $spid 2>/dev/null || true; rm -rf "$tmp"' EXIT
for t in valgrind callgrind_control callgrind_annotate curl; do
	command -v $t >/dev/null || { echo "needs $t (Debian: valgrind, curl)"; exit 1; }
done

config() { # $1: listen address or "", $2: threads
	cat <<YAML
model:
  path: $model
cpu:
  threads: $2
server:
  socket: $tmp/moed.sock
metrics:
  listen: "$1"
YAML
}

wait_up() {
	for _ in $(seq 600); do
		[ -S "$tmp/moed.sock" ] && "$bin/moectl" -s "$tmp/moed.sock" ping -c 1 >/dev/null 2>&1 &&
			return 0
		kill -0 $pid 2>/dev/null || break
		sleep 0.1
	done
	echo "moed did not start"; cat "$tmp/moed.log"; exit 1
}

# Every 100 ms over one kept-alive connection, as Prometheus scrapes.
scrape_loop() { # $1: address
	exec curl -s --rate 10/s "http://$1/metrics?[1-1000000]" >/dev/null
}

bound() {
	sed -n 's|.*metrics on http://\([^/]*\)/metrics.*|\1|p' "$tmp/moed.log" | head -1
}

stop() {
	kill -TERM $pid
	wait $pid || true
	pid=
	rm -f "$tmp/moed.sock"
}

# ---- 1. instructions -------------------------------------------------------
. "$src/bench/callgrind.sh" # totals, incl
declare -A ir
for mode in off scraped; do
	listen=
	[ $mode = scraped ] && listen=127.0.0.1:0
	config "$listen" 1 >"$tmp/$mode.yaml"
	MOE_CPU_ISA=avx2 valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes \
		--callgrind-out-file="$tmp/cg.$mode" "$bin/moed" -c "$tmp/$mode.yaml" \
		2>"$tmp/moed.log" &
	pid=$!
	wait_up
	MOE_CPU_ISA=avx2 "$bin/moe-load" --socket "$tmp/moed.sock" --model "$model" --clients 1 \
		--requests 10 --seed 3 >/dev/null
	callgrind_control -i on $pid >/dev/null
	if [ $mode = scraped ]; then
		scrape_loop "$(bound)" &
		spid=$!
	fi
	MOE_CPU_ISA=avx2 "$bin/moe-load" --socket "$tmp/moed.sock" --model "$model" \
		--clients "$clients" --requests "$reqs" --max-tokens "$maxt" --seed 7 >"$tmp/load.$mode"
	if [ -n "$spid" ]; then
		kill $spid; wait $spid 2>/dev/null || true
		spid=
	fi
	callgrind_control -i off $pid >/dev/null
	scrapes=$("$bin/moectl" -s "$tmp/moed.sock" status --json |
		sed -n 's/.*"scrapes_http":\([0-9]*\).*/\1/p')
	stop
	files=("$tmp"/cg.$mode-*)
	ir[$mode]=$(totals "${files[@]}")
	n=$((clients * reqs))
	rec=$(incl '(met_observe|srv_count_request|srv_metrics_sync|observe_start|observe_end) \[' \
		"${files[@]}")
	printf "%-8s %s\n         %s Ir in all: %.0f Ir/request; recording %.0f Ir/request (%.3f %%)\n" \
		"$mode" "$(tail -1 "$tmp/load.$mode" | sed 's/;.*//')" "${ir[$mode]}" \
		"$(echo "${ir[$mode]} / $n" | bc -l)" "$(echo "$rec / $n" | bc -l)" \
		"$(echo "$rec * 100 / ${ir[$mode]}" | bc -l)"
	if [ $mode = scraped ]; then
		# the endpoint's thread: the file whose functions include on_request
		http=$(grep -l 'on_request' "${files[@]}" | head -1)
		hir=$(totals "$http")
		printf "         %s scrapes; the endpoint's thread %s Ir: %.0f Ir a scrape, %.3f %% of the rest\n" \
			"$scrapes" "$hir" "$(echo "$hir / ($scrapes + ($scrapes == 0))" | bc -l)" \
			"$(echo "$hir * 100 / (${ir[$mode]} - $hir)" | bc -l)"
	fi
done
printf "scraped vs off: %+.3f %% instructions per request\n" \
	"$(echo "(${ir[scraped]} - ${ir[off]}) * 100 / ${ir[off]}" | bc -l)"

# ---- 2. wall clock ------------------------------------------------------------
echo "wall clock, $clients clients x $((reqs * 10)) requests, default kernels and threads, interleaved:"
declare -A all
for r in $(seq "$rounds"); do
	for mode in off scraped; do
		listen=
		[ $mode = scraped ] && listen=127.0.0.1:0
		config "$listen" 0 >"$tmp/w.yaml"
		"$bin/moed" -c "$tmp/w.yaml" 2>"$tmp/moed.log" &
		pid=$!
		wait_up
		if [ $mode = scraped ]; then
			scrape_loop "$(bound)" &
			spid=$!
		fi
		"$bin/moe-load" --socket "$tmp/moed.sock" --model "$model" --clients "$clients" \
			--requests $((reqs * 10)) --max-tokens "$maxt" --no-check --seed $r >"$tmp/wl"
		if [ -n "$spid" ]; then
			kill $spid; wait $spid 2>/dev/null || true
			spid=
		fi
		stop
		rps=$(sed -n 's/.* \([0-9.]*\) requests\/s.*/\1/p' "$tmp/wl")
		all[$mode]="${all[$mode]:-} $rps"
		printf "  round %d %-8s %s requests/s\n" "$r" "$mode" "$rps"
	done
done
for mode in off scraped; do
	echo "${all[$mode]}" | awk -v m=$mode '{ s = 0; lo = $1; hi = $1
		for (i = 1; i <= NF; i++) { s += $i; if ($i < lo) lo = $i; if ($i > hi) hi = $i }
		printf "  %-8s mean %.0f requests/s (%.0f .. %.0f)\n", m, s / NF, lo, hi }'
done
