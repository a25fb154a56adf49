#!/usr/bin/env bash
# JupyterLab on notebooks/ (make lab), served from the repository's top, so that the notebooks' links and
# figures in docs/ open too. Its kernels' channels are Unix sockets in the user's own runtime
# folder, not TCP ports on loopback: other local users cannot open them, and no kernel prints "Kernel is
# running over TCP without encryption" in a privacy course's terminal. A Unix socket's path holds at most 107 bytes,
# and a kernel's sockets add 50 to the folder's path: under a folder too deep for that, TCP on loopback, as
# Jupyter does by default. Options given to this script go to JupyterLab.
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=$(.venv/bin/jupyter --runtime-dir)
transport=ipc
if [ $(( $(printf %s "$runtime" | wc -c) + 50 )) -gt 107 ]; then
    transport=tcp
fi
# Notebook 03 can run as on a student's laptop: in .venv-client, with the client's packages only (the kernel
# "Python (client only, no TensorFlow)"). It needs Python 3.11 or newer; without one, 03 runs in .venv.
if ! scripts/setup-client.sh; then
    echo "note: no client-only kernel; notebook 03 runs in .venv, whose TensorFlow the client never uses" >&2
fi
as_root=()
if [ "$(id -u)" = 0 ]; then
    as_root=(--allow-root)  # Jupyter refuses to run as root (containers, many cloud machines) unless told it may
fi
exec .venv/bin/jupyter lab "${as_root[@]}" --KernelManager.transport="$transport" --ServerApp.root_dir=. \
    --LabApp.default_url=/lab/tree/notebooks "$@"
