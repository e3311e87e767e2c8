#!/usr/bin/env bash
# tests/cli_test.sh BIN_DIR FIXTURES_DIR — moed's command line: `moed -t`
# prints the plan and exits 0/1; bad configurations name FILE:LINE:COLUMN;
# moe-mkmodel writes a checkpoint that moed accepts.
set -u
bin=$1 fix=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0 n=0

check() { # name expected-rc regex command...
	local name=$1 rc=$2 re=$3
	shift 3
	local out got
	out=$("$@" 2>&1)
	got=$?
	n=$((n + 1))
	if [ "$got" != "$rc" ] || ! grep -Eq -- "$re" <<<"$out"; then
		echo "FAIL $name: exit $got (want $rc), output:"
		sed 's/^/    /' <<<"$out"
		fail=$((fail + 1))
	else
		echo "ok   $name"
	fi
}

check "plan of a fixture" 0 "fits: +yes" "$bin/moed" -t --model "$fix/qwen2_moe_bf16"
check "plan names the MoE layers" 0 "moe layers: +2 of 3: 0,2" \
	"$bin/moed" -t --model "$fix/qwen2_moe_bf16"
check "plan of a sharded f16 model" 0 "qwen3_moe \(f16 weights\)" \
	"$bin/moed" -t --model "$fix/qwen3_moe_f16_sharded"

cat >"$tmp/good.yaml" <<YAML
model:
  path: $fix/deepseek_v3_bf16
cpu:
  threads: 1
YAML
check "config file" 0 "family: +deepseek_v3" "$bin/moed" -t -c "$tmp/good.yaml"

printf 'model:\n  path: /x\ncpu:\n  threads: many\n' >"$tmp/bad.yaml"
check "bad value names file:line:column" 1 "bad.yaml:4:12: cpu.threads:" \
	"$bin/moed" -t -c "$tmp/bad.yaml"
printf 'model:\n  path: /x\n  colour: red\n' >"$tmp/unknown.yaml"
check "unknown key" 1 "unknown.yaml:3:3: model.colour:" "$bin/moed" -t -c "$tmp/unknown.yaml"
check "plan names the kernels" 0 "kernels: +(avx2|avx512|scalar|avx512bf16|amx)" \
	"$bin/moed" -t --model "$fix/olmoe_f32"
MOE_CPU_ISA=scalar check "MOE_CPU_ISA forces a path" 0 "kernels: +scalar" \
	"$bin/moed" -t --model "$fix/olmoe_f32"
MOE_CPU_ISA=bogus check "unknown path is an error" 1 "MOE_CPU_ISA=bogus: unknown" \
	"$bin/moed" -t --model "$fix/olmoe_f32"
check "missing checkpoint" 1 "/nonexistent" "$bin/moed" -t --model /nonexistent
# A GPU asked for and not there is an error, never a silent CPU fallback;
# where a GPU is usable, the plan names it.
if "$bin/moed" --devices cuda -t --model "$fix/olmoe_f32" 2>&1 | grep -q "backend: *cuda (GPU"; then
	check "GPU plan" 0 "backend: +cuda \(GPU 0: " "$bin/moed" --devices cuda -t \
		--model "$fix/olmoe_f32"
else
	check "GPU asked for, none usable" 1 \
		"backend: +ERROR: devices asks for a GPU, but none is usable|built without CUDA" \
		"$bin/moed" --devices cuda -t --model "$fix/olmoe_f32"
	check "serving refuses it too" 1 "none is usable|built without CUDA" \
		"$bin/moed" --devices cuda --model "$fix/olmoe_f32" --socket "$tmp/g.sock"
fi
check "GPU 63 is not there" 1 "asks for GPU 63|none is usable|built without CUDA" \
	"$bin/moed" --devices cuda:63 -t --model "$fix/olmoe_f32"
check "unknown --devices" 1 "expected cpu, cpu:R \(R CPU ranks, 1 to 64\), cuda or cuda:N" "$bin/moed" --devices tpu -t \
	--model "$fix/olmoe_f32"
check "--devices cpu:3: three CPU ranks in the plan" 0 "ranks: +3 \(cpu\)" "$bin/moed" \
	--devices cpu:3 -t --model "$fix/olmoe_f32"
check "--devices cpu:0 is refused" 1 "expected cpu, cpu:R" "$bin/moed" --devices cpu:0 -t \
	--model "$fix/olmoe_f32"
check "the CPU plan says why no GPU" 0 "backend: +cpu \(GPU: none" "$bin/moed" -t \
	--model "$fix/olmoe_f32"
check "socket path too long" 1 "longer than 107" "$bin/moed" --model "$fix/olmoe_f32" \
	--socket "/tmp/$(printf 'x%.0s' $(seq 120))"
check "usage" 2 "usage: moed" "$bin/moed"

check "mkmodel" 0 "wrote" "$bin/moe-mkmodel" --family deepseek_v2 --out "$tmp/ds2" \
	--hidden 64 --inter 32 --experts 8 --top-k 2 --layers 3 --dense-first 1 --dtype f16
check "moed accepts mkmodel output" 0 "moe layers: +2 of 3: 1,2" "$bin/moed" -t --model "$tmp/ds2"
check "load-only" 0 "loaded 2 MoE layers" "$bin/moed" --load-only --model "$tmp/ds2"

# moectl reload: its exit code and moed's reason, for refusals and failures
sock=$tmp/moed.sock
cp -r "$fix/qwen2_moe_bf16" "$tmp/same"
"$bin/moed" --model "$fix/qwen2_moe_bf16" --socket "$sock" 2>"$tmp/moed.log" &
mpid=$!
for _ in $(seq 300); do [ -S "$sock" ] && break; sleep 0.1; done
ctl() { "$bin/moectl" -s "$sock" "$@"; }
check "reload: nothing to roll back" 1 "no reload to roll back" ctl reload --rollback --wait
check "reload: a missing checkpoint" 1 "reload failed: .*No such file" \
	ctl reload --model "$tmp/missing" --wait
check "reload: another architecture" 1 "reload failed: .*not the same architecture" \
	ctl reload --model "$fix/olmoe_f32" --wait
check "reload: not an MoE layer" 1 "not an MoE layer" ctl reload --layers 1 --wait
check "reload: bad list" 2 "--layers: a list" ctl reload --layers 1-x
check "reload: a copy, layer by layer" 0 "done, 2 of 2: 2 layers in 2 epochs" \
	ctl reload --model "$tmp/same" --wait
check "reload: status counts" 0 "1 reloads done, 2 failed, 0 cancelled; rollback: possible" \
	ctl status
check "reload: rollback" 0 "done, 2 of 2" ctl reload --rollback --wait
kill -TERM $mpid
wait $mpid || { echo "FAIL moed exit $?"; fail=$((fail + 1)); }

echo "$((n - fail)) passed, $fail failed"
[ "$fail" -eq 0 ]
