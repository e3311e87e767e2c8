#!/usr/bin/env bash
# tests/metrics_test.sh BIN_DIR FIXTURES_DIR SRC_DIR — moed's metrics, end to end.
#
# A real moed (metrics.listen 127.0.0.1:0, per_expert on) and a real
# Prometheus server (Debian package prometheus) that scrapes it every
# second, with the shipped alert rules loaded. Clients send a known number
# of requests; then:
#  - the endpoint's text passes `promtool check metrics`;
#  - its metric families are exactly those docs/metrics.md documents;
#  - `moectl metrics` serves the same families; other paths are 404, other
#    methods 405; the bound address is in the log and `moectl status`;
#  - the requests counter, queried through Prometheus' HTTP API, equals
#    the number of requests sent (no-op pings are not counted);
#  - SIGTERM still stops moed at once (the HTTP thread blocks signals).
# Without promtool/prometheus (the package cannot be installed) it says
# SKIPPED and exits 77.
set -u
bin=$1 fix=$(cd "$2" && pwd) src=$(cd "$3" && pwd)
model=$fix/qwen2_moe_bf16
clients=2 per_client=30
sent=$((clients * per_client))

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
	echo "SKIPPED: promtool/prometheus not found (Debian package prometheus)"
	exit 77
fi
command -v curl >/dev/null || { echo "SKIPPED: curl not found"; exit 77; }

tmp=$(mktemp -d)
pid= ppid=
trap 'kill -9 $pid $ppid 2>/dev/null; rm -rf "$tmp"' EXIT
fail=0
bad() { echo "FAIL: $*"; fail=1; }

cat >"$tmp/moe.yaml" <<YAML
model:
  path: $model
server:
  socket: $tmp/moed.sock
metrics:
  listen: 127.0.0.1:0
  per_expert: true
  slo_p99_ms: 500
YAML
"$bin/moed" -c "$tmp/moe.yaml" 2>"$tmp/moed.log" &
pid=$!
for _ in $(seq 100); do [ -S "$tmp/moed.sock" ] || ! kill -0 $pid 2>/dev/null && break; sleep 0.1; done
[ -S "$tmp/moed.sock" ] || { echo "FAIL: moed did not start"; cat "$tmp/moed.log"; exit 1; }
addr=$(sed -n 's|.*metrics on http://\([^/]*\)/metrics.*|\1|p' "$tmp/moed.log" | head -1)
[ -n "$addr" ] || { echo "FAIL: no bound address in the log"; cat "$tmp/moed.log"; exit 1; }
echo "moed metrics on $addr"
"$bin/moectl" -s "$tmp/moed.sock" status --json | grep -q "\"address\":\"$addr\"" ||
	bad "moectl status --json does not carry the bound address $addr"
"$bin/moectl" -s "$tmp/moed.sock" status | grep -q "metrics: *http://$addr/metrics" ||
	bad "moectl status does not show the endpoint"

# A Prometheus server on a free port, scraping moed every second.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
	echo $((20000 + RANDOM % 30000)))
cat >"$tmp/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $src/docs/moed-alerts.yml
scrape_configs:
  - job_name: moed
    static_configs:
      - targets: ["$addr"]
YAML
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/prom" \
	--web.listen-address="127.0.0.1:$port" >"$tmp/prom.log" 2>&1 &
ppid=$!
api=http://127.0.0.1:$port/api/v1
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/-/ready" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$port/-/ready" >/dev/null ||
	{ echo "FAIL: prometheus did not start"; tail -20 "$tmp/prom.log"; exit 1; }

# The load: $sent requests, every output checked against an in-process engine.
"$bin/moectl" -s "$tmp/moed.sock" ping -c 20 >/dev/null || bad "ping"
"$bin/moe-load" --socket "$tmp/moed.sock" --model "$model" --clients $clients \
	--requests $per_client --max-tokens 64 >"$tmp/load.txt" 2>&1 || bad "moe-load: $(cat "$tmp/load.txt")"
tail -1 "$tmp/load.txt"

# The text: valid exposition, and every request counted (the loop counts a
# batch when it collects it, a few µs after the clients saw it: retry briefly).
for _ in $(seq 50); do
	curl -sf "http://$addr/metrics" >"$tmp/http.txt"
	n=$(awk '/^moed_requests_total\{/ {s += $2} END {print s + 0}' "$tmp/http.txt")
	[ "$n" = "$sent" ] && break
	sleep 0.1
done
[ "$n" = "$sent" ] || bad "moed_requests_total sums to $n, sent $sent"
grep -q "^moed_requests_total{status=\"ok\"} $sent\$" "$tmp/http.txt" ||
	bad "moed_requests_total{status=\"ok\"} is not $sent"
grep -q '^moed_request_duration_seconds_count '"$sent"'$' "$tmp/http.txt" ||
	bad "moed_request_duration_seconds_count is not $sent"
lint=$(promtool check metrics <"$tmp/http.txt" 2>&1) || bad "promtool check metrics: $lint"
[ -z "$lint" ] || bad "promtool check metrics says: $lint"
echo "promtool check metrics: ok ($(grep -vc '^#' "$tmp/http.txt") samples)"

# The documented list is the exported list.
grep '^# TYPE ' "$tmp/http.txt" | awk '{print $3}' | sort >"$tmp/exported"
awk '/^## Metrics/ {on = 1; next} /^## / {on = 0} on && /^\| *`moed_/ {
	split($0, f, "`"); print f[2] }' "$src/docs/metrics.md" | sort >"$tmp/documented"
if ! diff "$tmp/documented" "$tmp/exported" >"$tmp/diff"; then
	bad "docs/metrics.md and the export differ (< documented only, > exported only):"
	cat "$tmp/diff"
else
	echo "documented = exported: $(wc -l <"$tmp/exported") families"
fi

# The control socket serves the same families.
"$bin/moectl" -s "$tmp/moed.sock" metrics >"$tmp/sock.txt" || bad "moectl metrics"
grep '^# TYPE ' "$tmp/sock.txt" | awk '{print $3}' | sort | diff -q - "$tmp/exported" >/dev/null ||
	bad "moectl metrics and the endpoint export different families"
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://$addr/")" = 404 ] || bad "GET / is not 404"
[ "$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://$addr/metrics")" = 405 ] ||
	bad "POST /metrics is not 405"

# Prometheus has scraped the final counts: the query equals what was sent.
got=
for _ in $(seq 100); do
	got=$(curl -s "$api/query" --data-urlencode 'query=sum(moed_requests_total{job="moed"})' |
		sed -n 's/.*"value":\[[^,]*,"\([0-9.]*\)"\].*/\1/p')
	[ "$got" = "$sent" ] && break
	sleep 0.2
done
[ "$got" = "$sent" ] || bad "Prometheus says sum(moed_requests_total) = '$got', sent $sent"
echo "Prometheus: sum(moed_requests_total) = $got (sent $sent)"
rules=$(curl -s "$api/rules" | grep -o '"name":"Moed[A-Za-z0-9]*"' | sort -u | wc -l)
[ "$rules" -eq 6 ] || bad "Prometheus loaded $rules of the 6 shipped alert rules"
up=$(curl -s "$api/query" --data-urlencode 'query=up{job="moed"}' |
	sed -n 's/.*"value":\[[^,]*,"\([0-9]*\)"\].*/\1/p')
[ "$up" = 1 ] || bad "up{job=\"moed\"} is '$up'"

# SIGTERM stops moed promptly with the endpoint's thread running.
kill -TERM $pid
for _ in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
if kill -0 $pid 2>/dev/null; then
	bad "moed ignored SIGTERM for 10 s"
else
	wait $pid
	rc=$?
	[ $rc -eq 0 ] || bad "moed exited $rc on SIGTERM"
fi
pid=

kill $ppid 2>/dev/null && wait $ppid 2>/dev/null
ppid=
[ $fail -eq 0 ] && echo "ok: metrics"
exit $fail
