#!/usr/bin/env bash
# tools/pyenv.sh — prints the path of a virtualenv holding
# client/python/requirements-test.txt, creating it once.
#
# The environment lives outside the clone, under ${MOED_CACHE:-~/.cache/moed},
# named after the hash of the requirements file, so CI's clean clones reuse
# it and a change of pins builds a new one. PyPI's torch for Linux brings
# about 5 GB of CUDA wheels (about a minute on a fast link): that is paid
# once per pin set. Needs python3 with venv (Debian: python3-venv).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
req=$here/client/python/requirements-test.txt
cache=${MOED_CACHE:-$HOME/.cache/moed}
hash=$(sha256sum "$req" | cut -c1-12)
venv=$cache/venv-$hash
if [ -x "$venv/bin/python" ] && [ -f "$venv/.complete" ]; then
	echo "$venv"
	exit 0
fi
command -v python3 >/dev/null || { echo "pyenv.sh: python3 is needed" >&2; exit 1; }
mkdir -p "$cache"
rm -rf "$venv"
echo "pyenv.sh: creating $venv (pinned: $(grep -v '^#' "$req" | tr '\n' ' '))" >&2
python3 -m venv "$venv" >&2 ||
	{ echo "pyenv.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
touch "$venv/.complete"
echo "$venv"
