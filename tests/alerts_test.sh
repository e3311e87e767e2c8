#!/usr/bin/env bash
# tests/alerts_test.sh [SOURCE_DIR] — the Prometheus alert rules in
# docs/moed-alerts.yml: `promtool check rules` (syntax, PromQL, templates)
# and `promtool test rules tests/alerts_test.yml` (each alert fires, clears,
# and its near misses do not fire). Exits 77 (skipped) without promtool.
set -euo pipefail

src=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

if ! command -v promtool >/dev/null 2>&1; then
	echo "SKIPPED: promtool not found (Debian package prometheus)"
	exit 77
fi

cd "$src"
fail=0

echo "== promtool check rules docs/moed-alerts.yml"
promtool check rules docs/moed-alerts.yml 2>&1 || fail=1

# rule_files in the test file are relative to the test file
echo "== promtool test rules tests/alerts_test.yml"
promtool test rules tests/alerts_test.yml 2>&1 || fail=1

if [ "$fail" != 0 ]; then
	echo "FAIL: alert rules"
	exit 1
fi
echo "ok: alert rules"
