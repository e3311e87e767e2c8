#!/usr/bin/env bash
# tests/trace_test.sh BIN_DIR FIXTURES_DIR TRACE_CHECK REQUESTS — `moectl trace`
# against a real moed under load from moe-load.
#
#  - `moectl trace --count 100` prints exactly 100 lines, each a valid JSON
#    record with every documented field (tests/trace_check.c: experts' counts
#    add up to tokens x top_k, the stages add up to no more than latency_us);
#  - --layer L and --client PID: every record matches;
#  - Ctrl-C ends an unbounded trace with exit 0 and its summary on stderr;
#  - a tracer that never reads (its stdout a FIFO nobody reads: it blocks,
#    then moed's socket to it fills) loses records, counted in `moectl
#    status`, while moe-load's clients run: REQUESTS requests per client
#    with every output checked against the in-process engine, with and
#    without the stalled tracer, both rates printed (not compared: tests do
#    not assert on wall time; bench/trace_overhead.sh measures the cost).
# MOED_TEST_TRACE_RING=1024 keeps the ring small so that a few thousand
# requests overrun it (the default ring holds 8192 records on this model).
set -u
bin=$1 fix=$(cd "$2" && pwd) check=$3 requests=${4:-2000}
model=$fix/qwen2_moe_bf16
tmp=$(mktemp -d)
sock=$tmp/moed.sock
pid= lpid= spid=
trap 'kill -9 $pid $lpid $spid 2>/dev/null; exec 7>&- 2>/dev/null; rm -rf "$tmp"' EXIT
fail=0
bad() { echo "FAIL: $*"; fail=1; }
ctl() { "$bin/moectl" -s "$sock" "$@"; }
# a number from the status JSON: $1 a sed expression's capture
status_num() { ctl status --json | sed -n "s/$1/\\1/p" | head -1; }

MOED_TEST_TRACE_RING=1024 "$bin/moed" --model "$model" --socket "$sock" 2>"$tmp/moed.log" &
pid=$!
for _ in $(seq 100); do [ -S "$sock" ] || ! kill -0 $pid 2>/dev/null && break; sleep 0.1; done
[ -S "$sock" ] || { echo "FAIL: moed did not start"; cat "$tmp/moed.log"; exit 1; }
json=$(ctl status --json)
topk=$(sed -n 's/.*"top_k":\([0-9]*\).*/\1/p' <<<"$json")
experts=$(sed -n 's/.*"experts":\([0-9]*\),"top_k".*/\1/p' <<<"$json")
layer=$(sed -n 's/.*"moe_layers":\[\([0-9]*\).*/\1/p' <<<"$json")
[ -n "$topk" ] && [ -n "$experts" ] && [ -n "$layer" ] ||
	{ echo "FAIL: no top_k/n_experts/moe_layers in status"; exit 1; }

"$bin/moe-load" --socket "$sock" --model "$model" --clients 2 --requests 100000000 \
	--max-tokens 16 --no-check >/dev/null 2>&1 &
lpid=$!

# 100 records under load
ctl trace --count 100 >"$tmp/t100.jsonl" 2>"$tmp/t100.err" || bad "moectl trace --count 100: $(cat "$tmp/t100.err")"
"$check" --count 100 --top-k "$topk" --experts "$experts" <"$tmp/t100.jsonl" ||
	bad "moectl trace --count 100 is not 100 valid records"
grep -q "^moectl trace: 100 records, [0-9]* lost$" "$tmp/t100.err" ||
	bad "no summary on stderr: $(cat "$tmp/t100.err")"
head -c 400 "$tmp/t100.jsonl"
echo " ..."

# filters
ctl trace --count 20 --layer "$layer" >"$tmp/tl.jsonl" || bad "moectl trace --layer"
"$check" --count 20 --top-k "$topk" --experts "$experts" --layer "$layer" <"$tmp/tl.jsonl" ||
	bad "--layer $layer"
cpid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$tmp/t100.jsonl" | head -1)
ctl trace --count 20 --client "$cpid" >"$tmp/tp.jsonl" || bad "moectl trace --client"
"$check" --count 20 --top-k "$topk" --experts "$experts" --pid "$cpid" <"$tmp/tp.jsonl" ||
	bad "--client $cpid"
ctl trace --layer 100000 >/dev/null 2>"$tmp/bad.err" && bad "--layer 100000 accepted"
grep -q "not an MoE layer" "$tmp/bad.err" || bad "--layer 100000: $(cat "$tmp/bad.err")"

# Ctrl-C ends it with its summary
"$bin/moectl" -s "$sock" trace >"$tmp/tc.jsonl" 2>"$tmp/tc.err" &
tpid=$!
for _ in $(seq 100); do [ -s "$tmp/tc.jsonl" ] && break; sleep 0.05; done
kill -INT $tpid
wait $tpid
rc=$?
[ $rc -eq 0 ] || bad "moectl trace exited $rc on SIGINT"
grep -q "^moectl trace: [1-9][0-9]* records, [0-9]* lost$" "$tmp/tc.err" ||
	bad "no summary after SIGINT: $(cat "$tmp/tc.err")"

# A tracer that never reads: its stdout is a FIFO this shell holds open and
# never reads, so moectl blocks writing, and moed's socket to it fills.
mkfifo "$tmp/fifo"
exec 7<>"$tmp/fifo"
"$bin/moectl" -s "$sock" trace >"$tmp/fifo" 2>/dev/null &
spid=$!
lost=0
for _ in $(seq 300); do
	lost=$(status_num '.*"tracers":\[{[^]]*"lost":\([0-9]*\).*')
	[ -n "$lost" ] && [ "$lost" -gt 0 ] && break
	sleep 0.1
done
[ -n "$lost" ] && [ "$lost" -gt 0 ] || bad "the stalled tracer lost nothing (lost '$lost')"
ctl status | grep -E "^trace: +1 tracer; [0-9]+ records, [0-9]+ sent, [1-9][0-9]* lost" ||
	bad "moectl status does not show the tracer's losses"
kill $lpid 2>/dev/null
wait $lpid 2>/dev/null
lpid=

# the clients' throughput with the stalled tracer attached, then without
"$bin/moe-load" --socket "$sock" --model "$model" --clients 2 --requests "$requests" \
	--max-tokens 16 >"$tmp/with.txt" 2>&1 || bad "moe-load with a stalled tracer: $(cat "$tmp/with.txt")"
lost2=$(status_num '.*"tracers":\[{[^]]*"lost":\([0-9]*\).*')
kill -TERM $spid # (blocked writing to the FIFO: the write is interrupted)
wait $spid
rc=$?
spid=
[ $rc -eq 0 ] || bad "the stalled moectl trace exited $rc on SIGTERM"
exec 7>&-
for _ in $(seq 100); do
	ctl status --json | grep -q '"tracers":\[\]' && break
	sleep 0.05
done
ctl status --json | grep -q '"tracers":\[\]' || bad "the killed tracer is still attached"
"$bin/moe-load" --socket "$sock" --model "$model" --clients 2 --requests "$requests" \
	--max-tokens 16 >"$tmp/without.txt" 2>&1 || bad "moe-load without a tracer: $(cat "$tmp/without.txt")"
rate() { sed -n 's/.* \([0-9]*\) requests\/s.*/\1/p' "$1"; }
echo "stalled tracer attached: $(rate "$tmp/with.txt") requests/s, every output checked;" \
	"its lost records $lost -> ${lost2:-?}"
echo "no tracer:               $(rate "$tmp/without.txt") requests/s, every output checked"
[ -n "$lost2" ] && [ "$lost2" -gt "$lost" ] || bad "lost did not grow while the tracer stalled"
tot=$(status_num '.*"trace":{[^}]*"lost":\([0-9]*\).*')
[ -n "$tot" ] && [ "$tot" -ge "$lost2" ] || bad "status trace.lost '$tot' < the tracer's $lost2"

kill -TERM $pid
wait $pid
rc=$?
pid=
[ $rc -eq 0 ] || bad "moed exited $rc"
[ $fail -eq 0 ] && echo "ok: trace"
exit $fail
