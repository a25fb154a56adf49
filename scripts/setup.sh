#!/usr/bin/env bash
# Create .venv with Python 3.10 and the pinned packages, unless it is already up to date,
# and build the listen guard that keeps TensorFlow's servers off the network (src/listen_guard).
# Usage: scripts/setup.sh   (called by `make run`, `make test` and `make lab`)
set -euo pipefail
cd "$(dirname "$0")/.."

guard=src/listen_guard/build/libprivate_predictions_listen_guard.so
build_guard() {
    # A C compiler builds it; a machine without one gets Zig's, from the package index.
    if [ -z "${CC:-}" ] && ! command -v cc >/dev/null && ! command -v gcc >/dev/null && ! command -v clang >/dev/null; then
        .venv/bin/python -m pip install --quiet "ziglang==0.17.0"
    fi
    .venv/bin/python -m listen_guard.build
}

is_python310() {
    # pyenv puts a python3.10 shim on PATH that fails unless 3.10 is selected, so run it.
    [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1
}

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" "$(command -v python3.10 || true)" \
            "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.10.*/bin/python3.10 \
            "$(uv python find 3.10 2>/dev/null || true)"; do
        if is_python310 "$candidate"; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

stamp=.venv/.requirements.sha256
wanted=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    if [ ! -f "$guard" ] || [ src/listen_guard/bind.c -nt "$guard" ]; then
        build_guard
    fi
    exit 0
fi

if ! python=$(find_python); then
    cat >&2 <<'MSG'
error: Python 3.10 was not found, and this series needs it.
tf-encrypted 0.9.1 runs only on tensorflow 2.9.1, which is built for Python 3.8-3.10.
Install Python 3.10 with one of:
    pyenv install 3.10          (https://github.com/pyenv/pyenv)
    uv python install 3.10      (https://docs.astral.sh/uv/)
    sudo apt-get install python3.10 python3.10-venv
or point PYTHON at one: PYTHON=/path/to/python3.10 make test
MSG
    exit 1
fi

echo "Setting up .venv with $python; this takes a few minutes the first time."
rm -rf .venv
"$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade "pip<25"
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
build_guard
.venv/bin/python -c "import private_predictions._tf" # fails loudly without secure randomness
echo "$wanted" > "$stamp"
