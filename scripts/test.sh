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
    failed=0
    for _ in "${pids[@]}"; do
        if ! wait -n; then
            # 02 serves until 03 says it is done: once one notebook of a stage fails, the others
            # are stopped, instead of waiting for their cell's timeout.
            [ "$failed" = 1 ] || kill -TERM "${pids[@]}" 2>/dev/null || true
            failed=1
        fi
    done
    [ "$failed" = 0 ]
done
