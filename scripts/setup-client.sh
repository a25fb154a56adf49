#!/usr/bin/env bash
# Create .venv-client: the client's environment, as a student's laptop has it. The newest Python on
# this machine (not the servers' 3.10), only requirements-client.txt, and no TensorFlow. Registers it
# as the Jupyter kernel "private-predictions-client" of .venv, with which the tests run notebook 03.
# Usage: scripts/setup-client.sh   (called by scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

newest_python() {
    local candidate
    # pyenv's versions first (its shims run only the version selected), newest first; then PATH's.
    for candidate in "${CLIENT_PYTHON:-}" \
            $(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.*/bin/python3 2>/dev/null | sort -rV) \
            python3.14 python3.13 python3.12 python3.11; do
        # pyenv's shims fail unless that version is installed, so run each one.
        if [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

stamp=.venv-client/.requirements.sha256
wanted=$(cat requirements-client.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv-client/bin/python ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    if ! python=$(newest_python); then
        echo "error: no Python 3.11 or newer found for the client's environment; set CLIENT_PYTHON" >&2
        exit 1
    fi
    echo "Setting up .venv-client with $("$python" --version) (the client needs no TensorFlow)."
    rm -rf .venv-client
    "$python" -m venv .venv-client
    .venv-client/bin/python -m pip install --quiet --upgrade pip
    .venv-client/bin/python -m pip install --quiet -r requirements-client.txt
    echo "$wanted" > "$stamp"
fi
if .venv-client/bin/python -c "import tensorflow" >/dev/null 2>&1; then
    echo "error: TensorFlow can be imported in .venv-client, which must not need it" >&2
    exit 1
fi
# ipykernel stages the kernel's files in a folder of its own under TMPDIR and never removes it: one empty
# tmp*_kernels folder per run, left in /tmp. It stages them in a folder of ours instead, removed after.
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
TMPDIR="$staging" .venv-client/bin/python -m ipykernel install --prefix "$PWD/.venv" \
    --name private-predictions-client --display-name "Python (client only, no TensorFlow)" >/dev/null 2>&1
