#!/usr/bin/env bash
# bench/fixed_cost.sh BEFORE_BUILD AFTER_BUILD [ROUNDS]
#
# The fixed cost of a 1-token call (issue 17, point 4), before and after,
# alternating builds in the same run. Decode is a chain of such calls, one
# per MoE layer per token; what a call costs beyond reading its experts'
# weights is paid on every layer of every token.
#
# Three OLMoE-shaped bf16 layers (hidden 512, 8 experts, top-2) that differ
# only in the experts' intermediate size, so a 1-token call does the same
# work except for the bytes of weights it reads:
#
#   inter 16    2 x 48 KiB touched   -> the call's time is its fixed cost
#                                       (the weights stream in < 1 us)
#   inter 64    2 x 192 KiB touched  (the whole layer 1.5 MiB)
#   inter 256   2 x 768 KiB touched  (the tiny layer of `moe-bench ipc`)
#
# In process: `moe-bench --model M --warm --tokens 1 --threads 2` (calls
# back to back over 8 inputs; --warm: no buffer read between calls; a
# build that predates --warm never read one). Through moed: the 1-token
# p50 of each build's own `moe-bench ipc` on the inter 256 layer.
#
# BEFORE_BUILD / AFTER_BUILD: build directories (bin/moe-bench,
# bin/moe-mkmodel, bin/moed in each). Prints each run and the medians.
set -u
before=${1:?usage: bench/fixed_cost.sh BEFORE_BUILD AFTER_BUILD [ROUNDS]}
after=${2:?usage: bench/fixed_cost.sh BEFORE_BUILD AFTER_BUILD [ROUNDS]}
rounds=${3:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null; rm -rf "$tmp"' EXIT
inters="16 64 256"

for i in $inters; do
	"$after/bin/moe-mkmodel" --family olmoe --hidden 512 --inter "$i" --experts 8 --top-k 2 \
		--layers 1 --dtype bf16 --out "$tmp/i$i" >/dev/null ||
		{ echo "cannot write the synthetic model"; exit 1; }
done

echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) CPUs"
echo "# before: $before; after: $after (source tree at $(git -C "$here" rev-parse --short HEAD 2>/dev/null))"

inproc() { # build $1, model $2: the 1-token median in us (moe-bench prints ms to 3 decimals) and, where the build prints it, the mean per stage
	local warm=
	"$1/bin/moe-bench" --help 2>&1 | grep -q -- --warm && warm=--warm
	"$1/bin/moe-bench" --model "$2" $warm --tokens 1 --threads 2 --min-time 1 2>&1 |
		awk '$1 == "1" && $2 ~ /^[0-9.]+$/ {printf "%.0f", $2 * 1000}
		     /mean per call/ {sub(/.*us: /, ""); printf "  (%s)", $0}'
}

ipc() { # build $1: the 1-token p50 through its own moed on the inter 256 layer
	"$1/bin/moe-bench" ipc --model "$tmp/i256" --count 5000 2>/dev/null |
		awk '/^1-token forward through moed/ {print $(NF-2)}'
}

declare -A res
for r in $(seq "$rounds"); do
	for side in before after; do
		b=$before
		[ $side = after ] && b=$after
		for i in $inters; do
			line=$(inproc "$b" "$tmp/i$i")
			echo "round $r $side inter $i: ${line:-failed} us"
			res[$side,$i]+="${line%% *} "
		done
		v=$(ipc "$b")
		echo "round $r $side ipc 1-token p50: ${v:-failed} us"
		res[$side,ipc]+="$v "
	done
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)]; else print "-"}'; }
echo
printf "%-36s %10s %10s\n" "1-token call, median us" before after
for i in $inters; do
	printf "%-36s %10s %10s\n" "in process, inter $i" "$(median <<<"${res[before,$i]}")" \
		"$(median <<<"${res[after,$i]}")"
done
printf "%-36s %10s %10s\n" "through moed (ipc p50), inter 256" "$(median <<<"${res[before,ipc]}")" \
	"$(median <<<"${res[after,ipc]}")"
