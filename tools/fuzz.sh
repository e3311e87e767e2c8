#!/usr/bin/env bash
# tools/fuzz.sh [SECONDS_PER_TARGET] — build the fuzz targets with clang's
# libFuzzer (+ ASan/UBSan), replay the committed corpora, then fuzz each
# target for SECONDS_PER_TARGET (default 20) from its corpus. New inputs go
# to build-fuzz/corpus-*/ (merge interesting ones into tests/fuzz/corpus/).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-12}
out=build-fuzz
mkdir -p "$out"
if ! command -v clang >/dev/null; then
	echo "fuzz: clang not found (apt install clang libclang-rt-14-dev)" >&2
	exit 1
fi
cflags=(-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
	-D_GNU_SOURCE -std=c11 -I.)
formats=(formats/safetensors.c formats/errbuf.c)
model=(daemon/engine/model.c daemon/engine/checkpoint.c kernels/cpu/convert.c "${formats[@]}")

build() { # name sources... -- libs...
	local name=$1
	shift
	clang "${cflags[@]}" "tests/fuzz/fuzz_$name.c" "$@" -o "$out/fuzz_$name"
}
build safetensors "${formats[@]}" -lcjson -lm
build model_config "${model[@]}" -lcjson -lm
build config daemon/server/config{,_keys,_values,_scalar,_messages}.c -lyaml
build proto ipc/moe_proto.c
build sqe ipc/moe_proto.c
build session tests/fuzz/session_engine.c \
	daemon/server/{server,io,refusals,sched,session,admin,placement_ops,reload_ops,status,auth,worker,jobs,metrics,metrics_loop,metrics_http,trace}.c \
	daemon/engine/migrate.c daemon/engine/rebalance.c \
	daemon/engine/log.c daemon/engine/placement.c daemon/engine/stats.c formats/errbuf.c \
	ipc/moe_proto.c kernels/cpu/convert.c -lcjson -lpthread -lm

status=0
for t in safetensors model_config config proto sqe session; do
	corpus=tests/fuzz/corpus/$t
	fresh=$out/corpus-$t
	mkdir -p "$fresh"
	echo "== fuzz_$t: replay $(ls "$corpus" | wc -l) corpus inputs, then ${secs}s of fuzzing"
	if ! "$out/fuzz_$t" -runs=0 "$corpus" >"$out/$t.replay.log" 2>&1; then
		tail -30 "$out/$t.replay.log"
		status=1
		continue
	fi
	if ! "$out/fuzz_$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
		-artifact_prefix="$out/$t-" "$fresh" "$corpus" >"$out/$t.log" 2>&1; then
		tail -30 "$out/$t.log"
		echo "fuzz_$t: FINDING (reproducer in $out/$t-*)"
		status=1
	else
		grep -E "^#[0-9]+.*DONE|Done [0-9]+ runs" "$out/$t.log" | tail -1 || true
	fi
done
exit $status
