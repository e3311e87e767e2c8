#!/usr/bin/env bash
# bench/trace_overhead.sh [BUILD_DIR] [REQUESTS] [ROUNDS] [BASE_BUILD_DIR] — what
# request tracing costs.
#
# 1. Instructions (valgrind --tool=callgrind, as bench/metrics_overhead.sh:
#    counts, repeatable whatever else the machine does): moed on the shipped
#    demo model (MOE_BENCH_MODEL), MOE_CPU_ISA=avx2, cpu.threads 1, one
#    client (MOE_BENCH_CLIENTS) sending REQUESTS requests of 1..16 tokens
#    with a fixed seed, instrumented after a warm-up. Runs:
#     - base:    BASE_BUILD_DIR's moed (a build of the commit before tracing,
#                same options), if given: the serving path with no tracing
#                code at all;
#     - none:    no tracer attached: what tracing costs when nobody traces;
#                also the inclusive instructions of the tracing functions
#                (they must not run at all);
#     - reading: `moectl trace > /dev/null` attached through the load;
#     - stalled: `moectl trace` into a FIFO nobody reads (it blocks, moed's
#                socket to it fills, the ring overruns it): a tracer that
#                never reads. Its lost records are printed.
#    Instructions per request of each, against `none` (and `base`).
# 2. Wall clock, secondary: none and stalled natively (default kernels and
#    threads), 4 clients, interleaved ROUNDS times; requests/s each round.
# MOE_BENCH_TRACE_RING=N runs every moed with MOED_TEST_TRACE_RING=N (a
# ring of N records), so that a stalled tracer overruns it within the few
# requests valgrind allows: the path where records are lost is then
# measured too.
set -eu
build=${1:-build-rel}
reqs=${2:-400}
rounds=${3:-3}
base=${4:-}
clients=${MOE_BENCH_CLIENTS:-1}
export MOED_TEST_TRACE_RING=${MOE_BENCH_TRACE_RING:-0}
maxt=${MOE_BENCH_MAX_TOKENS:-16}
src=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "$build/bin" && pwd)
model=${MOE_BENCH_MODEL:-$src/demo-model}
tmp=$(mktemp -d)
pid= tpid=
trap 'kill -9 $pid $tpid 2>/dev/null || true; exec 7>&- 2>/dev/null; rm -rf "$tmp"' EXIT
for t in valgrind callgrind_control callgrind_annotate bc; do
	command -v $t >/dev/null || { echo "needs $t (Debian: valgrind, bc)"; exit 1; }
done
mkfifo "$tmp/fifo"
exec 7<>"$tmp/fifo" # held open, never read

config() { # $1 threads
	printf 'model:\n  path: %s\ncpu:\n  threads: %s\nserver:\n  socket: %s\n' \
		"$model" "$1" "$tmp/moed.sock"
}

wait_up() { # $1 bin
	for _ in $(seq 600); do
		[ -S "$tmp/moed.sock" ] && "$1/moectl" -s "$tmp/moed.sock" ping -c 1 >/dev/null 2>&1 &&
			return 0
		kill -0 $pid 2>/dev/null || break
		sleep 0.1
	done
	echo "moed did not start"; cat "$tmp/moed.log"; exit 1
}

stop() {
	kill -TERM $pid
	wait $pid || true
	pid=
	rm -f "$tmp/moed.sock"
}

tracer() { # $1 mode, $2 bin
	case $1 in
	reading) "$2/moectl" -s "$tmp/moed.sock" trace >/dev/null 2>"$tmp/tracer.err" & tpid=$! ;;
	stalled) "$2/moectl" -s "$tmp/moed.sock" trace >"$tmp/fifo" 2>"$tmp/tracer.err" & tpid=$! ;;
	*) return 0 ;;
	esac
	for _ in $(seq 100); do # attached: status lists it
		"$2/moectl" -s "$tmp/moed.sock" status --json | grep -q '"tracers":\[{' && return 0
		sleep 0.1
	done
	echo "the tracer did not attach"; exit 1
}

trace_lost() { # $1 bin
	"$1/moectl" -s "$tmp/moed.sock" status --json |
		sed -n 's/.*"trace":{[^}]*"sent":\([0-9]*\),"lost":\([0-9]*\).*/sent \1, lost \2/p'
}

untrace() {
	[ -n "$tpid" ] || return 0
	kill -TERM $tpid 2>/dev/null || true
	wait $tpid 2>/dev/null || true
	tpid=
}

. "$src/bench/callgrind.sh" # totals, incl

# ---- 1. instructions ------------------------------------------------------------
n=$((clients * reqs))
modes="none reading stalled"
[ -n "$base" ] && modes="base $modes"
declare -A ir
config 1 >"$tmp/cg.yaml"
for mode in $modes; do
	b=$bin
	[ $mode = base ] && b=$(cd "$base/bin" && pwd)
	MOE_CPU_ISA=avx2 valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes \
		--callgrind-out-file="$tmp/cg.$mode" "$b/moed" -c "$tmp/cg.yaml" 2>"$tmp/moed.log" &
	pid=$!
	wait_up "$b"
	MOE_CPU_ISA=avx2 "$bin/moe-load" --socket "$tmp/moed.sock" --model "$model" --clients 1 \
		--requests 10 --seed 3 >/dev/null
	tracer $mode "$b"
	callgrind_control -i on $pid >/dev/null 2>&1
	MOE_CPU_ISA=avx2 "$bin/moe-load" --socket "$tmp/moed.sock" --model "$model" \
		--clients "$clients" --requests "$reqs" --max-tokens "$maxt" --seed 7 >"$tmp/load.$mode"
	callgrind_control -i off $pid >/dev/null 2>&1
	lost=
	[ $mode = reading ] || [ $mode = stalled ] && lost="; tracer: $(trace_lost "$b")"
	untrace
	stop
	files=("$tmp"/cg.$mode-*)
	ir[$mode]=$(totals "${files[@]}")
	tr=$(incl '(srv_trace_[a-z_]*|trace_prepare|trace_routing|trace_hits) \[' "${files[@]}")
	printf "%-8s %s\n         %.0f Ir/request; tracing functions %.0f Ir/request%s\n" "$mode" \
		"$(tail -1 "$tmp/load.$mode" | sed 's/;.*//')" "$(echo "${ir[$mode]} / $n" | bc -l)" \
		"$(echo "$tr / $n" | bc -l)" "$lost"
done
for mode in $modes; do
	[ $mode = none ] && continue
	printf "%-8s vs none: %+.3f %% instructions per request\n" $mode \
		"$(echo "(${ir[$mode]} - ${ir[none]}) * 100 / ${ir[none]}" | bc -l)"
done

# ---- 2. wall clock ----------------------------------------------------------------
echo "wall clock, 4 clients x $((reqs * 10)) requests, default kernels and threads, interleaved:"
declare -A all
config 0 >"$tmp/w.yaml"
for r in $(seq "$rounds"); do
	for mode in none stalled; do
		"$bin/moed" -c "$tmp/w.yaml" 2>"$tmp/moed.log" &
		pid=$!
		wait_up "$bin"
		tracer $mode "$bin"
		"$bin/moe-load" --socket "$tmp/moed.sock" --model "$model" --clients 4 \
			--requests $((reqs * 10)) --max-tokens "$maxt" --no-check --seed $r >"$tmp/wl"
		lost=
		[ $mode = stalled ] && lost=" ($(trace_lost "$bin"))"
		untrace
		stop
		rps=$(sed -n 's/.* \([0-9.]*\) requests\/s.*/\1/p' "$tmp/wl")
		all[$mode]="${all[$mode]:-} $rps"
		printf "  round %d %-8s %s requests/s%s\n" "$r" "$mode" "$rps" "$lost"
	done
done
for mode in none stalled; do
	echo "${all[$mode]}" | awk -v m=$mode '{ s = 0; lo = $1; hi = $1
		for (i = 1; i <= NF; i++) { s += $i; if ($i < lo) lo = $i; if ($i > hi) hi = $i }
		printf "  %-8s mean %.0f requests/s (%.0f .. %.0f)\n", m, s / NF, lo, hi }'
done
