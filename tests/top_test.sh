#!/usr/bin/env bash
# tests/top_test.sh BIN_DIR FIXTURES_DIR — `moectl top` driven in tmux.
#
# A real moed under load from moe-load; `moectl top` runs in an 80x24 tmux
# pane (then a wider one): the screen must show the header, non-zero
# request and token rates, a load bar per rank and one heat row per MoE
# layer, and fit the pane; `q` must exit 0 with the terminal restored
# (alternate screen left, canonical mode and echo back on). Without tmux:
# SKIPPED, exit 77.
set -u
bin=$1 fix=$(cd "$2" && pwd)
model=$fix/qwen2_moe_bf16
command -v tmux >/dev/null || { echo "SKIPPED: tmux not found (Debian tmux)"; exit 77; }

tmp=$(mktemp -d)
sock=$tmp/moed.sock
# A tmux server of our own (-L): the default one is shared with whatever
# else runs tmux as this user. Each run gets a new session, made before the
# last one is killed: a server left with no session exits, and a
# new-session racing that exit failed ("server exited unexpectedly").
tmux() { command tmux -L "moetop$$" "$@"; }
sess=
runs=0
pid= lpid=
trap 'tmux kill-server 2>/dev/null; kill -9 $pid $lpid 2>/dev/null; rm -rf "$tmp"' EXIT
fail=0
bad() { echo "FAIL: $*"; fail=1; }

"$bin/moed" --model "$model" --socket "$sock" 2>"$tmp/moed.log" &
pid=$!
for _ in $(seq 100); do [ -S "$sock" ] || ! kill -0 $pid 2>/dev/null && break; sleep 0.1; done
[ -S "$sock" ] || { echo "FAIL: moed did not start"; cat "$tmp/moed.log"; exit 1; }
layers=$("$bin/moectl" -s "$sock" status --json | grep -o '"moe_layers":\[[0-9,]*\]' |
	tr -cd ',' | wc -c)
layers=$((layers + 1))

"$bin/moe-load" --socket "$sock" --model "$model" --clients 2 --requests 1000000 \
	--max-tokens 16 --no-check >/dev/null 2>&1 &
lpid=$!

# one pane: the shell runs top, then says how it ended and the tty's mode.
# The report is written whole and renamed into place: waiting for a file
# that is merely non-empty raced `stty -a` under a loaded ctest -j.
run_top() { # $1 cols, $2 rows
	local old=$sess
	rm -f "$tmp/after"
	runs=$((runs + 1))
	sess=top$runs
	tmux new-session -d -s $sess -x "$1" -y "$2" \
		"$bin/moectl -s $sock top; { echo EXIT=\$?; stty -a; } >$tmp/after.part; mv $tmp/after.part $tmp/after; sleep 30"
	[ -z "$old" ] || tmux kill-session -t "$old" 2>/dev/null
}

check_screen() { # $1 cols, $2 rows
	local screen
	sleep 3.5 # the first frame has no rates; three later ones do
	screen=$(tmux capture-pane -p -t $sess)
	echo "--- ${1}x$2:"
	echo "$screen"
	grep -q "^moed serving" <<<"$screen" || bad "${1}x$2: no header"
	grep -Eq "requests/s [1-9][0-9]* +tokens/s [1-9][0-9]*" <<<"$screen" ||
		bad "${1}x$2: no non-zero request and token rates"
	grep -Eq "p50 [0-9.]+ (us|ms) +p99 [0-9.]+ (us|ms)" <<<"$screen" || bad "${1}x$2: no p50/p99"
	grep -Eq '^rank 0 +\[#+ *\]' <<<"$screen" || bad "${1}x$2: no load bar for rank 0"
	n=$(grep -Ec '^L[0-9]+ +[0-9.]+\|.+\|$' <<<"$screen")
	[ "$n" -eq "$layers" ] || bad "${1}x$2: $n heat rows, the model has $layers MoE layers"
	[ "$(awk -v w="$1" 'length($0) > w' <<<"$screen" | wc -l)" -eq 0 ] ||
		bad "${1}x$2: lines wider than the pane"
	[ "$(tmux display -p -t $sess '#{alternate_on}')" = 1 ] ||
		bad "${1}x$2: top does not use the alternate screen"
}

quit_top() {
	tmux send-keys -t $sess q
	for _ in $(seq 100); do [ -s "$tmp/after" ] && break; sleep 0.1; done
	grep -q '^EXIT=0$' "$tmp/after" 2>/dev/null || bad "q: top did not exit 0 ($(head -1 "$tmp/after" 2>/dev/null))"
	grep -Eq '(^| )icanon( |$)' "$tmp/after" && grep -Eq '(^| )echo( |$)' "$tmp/after" ||
		bad "q: the terminal was not restored (icanon/echo off)"
	[ "$(tmux display -p -t $sess '#{alternate_on}')" = 0 ] ||
		bad "q: the alternate screen is still on"
}

run_top 80 24
check_screen 80 24
quit_top
run_top 132 40
check_screen 132 40
quit_top

# Ctrl-C is a way out too, and restores the terminal
run_top 80 24
sleep 1.5
tmux send-keys -t $sess C-c
for _ in $(seq 100); do [ -s "$tmp/after" ] && break; sleep 0.1; done
grep -Eq '(^| )icanon( |$)' "$tmp/after" 2>/dev/null || bad "Ctrl-C: the terminal was not restored"

kill $lpid 2>/dev/null
wait $lpid 2>/dev/null
lpid=
[ $fail -eq 0 ] && echo "ok: moectl top"
exit $fail
