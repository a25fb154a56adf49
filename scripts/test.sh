#!/usr/bin/env bash
# The whole test suite: unit tests, then every notebook with nbval, stage by stage, in English
# and in Spanish (notebooks in one stage run at the same time, one kernel each). Notebook 03, the
# client's, runs in .venv-client (the newest Python here, no TensorFlow), against the servers that
# notebook 02 starts from .venv: as a student's laptop would ask a teacher's servers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-client.sh
python=.venv/bin/python
nbval="--nbval --nbval-cell-timeout=600 --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider"

$python -m pytest tests/ -p no:cacheprovider
$python -m private_predictions.series --stages --language en --language es | while read -r -a stage; do
    pids=()
    for notebook in "${stage[@]}"; do
        case "$notebook" in
            */03_*) kernel="--nbval-kernel-name private-predictions-client" ;;
            *) kernel="--nbval-current-env" ;;
        esac
        $python -m pytest $nbval $kernel "$notebook" </dev/null &
        pids+=($!)
    done
    # In a stage of several, the first notebook (02) serves in its last cell until it is interrupted:
    # once the others (03) have passed, its kernel (a child of its pytest) gets SIGINT, as a learner
    # ends serving with ■. Once one notebook fails, the others are stopped at once instead of waiting
    # for their cell's timeout. (SIGINT would not stop a pytest: background jobs ignore it.)
    running=("${pids[@]}")
    failed=0
    while [ "${#running[@]}" -gt 0 ]; do
        status=0
        wait -n -p finished "${running[@]}" || status=$?
        left=()
        for pid in "${running[@]}"; do [ "$pid" = "$finished" ] || left+=("$pid"); done
        running=("${left[@]+"${left[@]}"}")
        if [ "$status" != 0 ] && [ "$failed" = 0 ]; then
            failed=1
            [ "${#running[@]}" = 0 ] || kill -TERM "${running[@]}" 2>/dev/null || true
        elif [ "$failed" = 0 ] && [ "${#pids[@]}" -gt 1 ] && [ "${running[*]}" = "${pids[0]}" ]; then
            pkill -INT -P "${pids[0]}" || true
        fi
    done
    [ "$failed" = 0 ]
done
