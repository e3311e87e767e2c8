#!/usr/bin/env bash
# tests/python_test.sh BIN_DIR SOURCE_DIR — the Python client's tests
# (client/python/tests: the binding on the fixtures, and end to end with
# transformers for every family), in the cached virtualenv of
# tools/pyenv.sh (created on the first run: ~5 GB of PyPI wheels).
# Release builds only: Python cannot load an ASan libmoeclient without
# preloading the runtime.
set -euo pipefail
bin=$1 src=$2
venv=$("$src/tools/pyenv.sh") || { echo "python_test.sh: no virtualenv (tools/pyenv.sh)"; exit 1; }
export MOED_BIN_DIR=$bin MOECLIENT_LIB=$bin/../lib/libmoeclient.so.1
cd "$src/client/python"
"$venv/bin/python" -m unittest discover -s tests -v 2>&1 | grep -v "ResourceWarning\|tracemalloc"
exit "${PIPESTATUS[0]}"
