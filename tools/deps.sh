#!/usr/bin/env bash
# tools/deps.sh — make sure the Debian packages moed needs are installed.
#
#   tools/deps.sh build     compiler, cmake, libcjson, libyaml, libmicrohttpd (+ libsystemd)
#   tools/deps.sh test      build + cmocka + clang/libFuzzer + prometheus (promtool)
#
# Installs what is missing with apt-get when run as root (or with sudo
# available without a password); otherwise names the packages and stops.
set -euo pipefail

want=(build-essential cmake pkg-config libcjson-dev libyaml-dev libsystemd-dev libssl-dev
	libmicrohttpd-dev)
if [ "${1:-build}" = test ]; then
	# systemd: systemd-analyze verify and systemd-socket-activate in the tests
	# prometheus: promtool and a real server for the metrics tests; curl
	want+=(libcmocka-dev clang libclang-rt-14-dev systemd prometheus curl man-db groff-base tmux)
fi

missing=()
for p in "${want[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing+=("$p")
	fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
	echo "moed needs these packages (Debian names): ${missing[*]}" >&2
	echo "this is not a Debian-like system: install their equivalents and retry" >&2
	exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
	sudo=()
elif sudo -n true 2>/dev/null; then
	sudo=(sudo -n)
else
	echo "moed needs these Debian packages: ${missing[*]}" >&2
	echo "install them with: sudo apt-get install ${missing[*]}" >&2
	exit 1
fi
echo "installing: ${missing[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
