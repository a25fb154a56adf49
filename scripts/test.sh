#!/usr/bin/env bash
# The whole test suite: unit tests, then every notebook with nbval, stage by stage, in English
# and in Spanish (notebooks in one stage run at the same time, one kernel each).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
python=.venv/bin/python
nbval="--nbval --nbval-current-env --nbval-cell-timeout=600 --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider"

$python -m pytest tests/ -p no:cacheprovider
$python -m private_predictions.series --stages --language en --language es | while read -r -a stage; do
    if [ "${#stage[@]}" -gt 1 ]; then
        $python -m pytest $nbval -n "${#stage[@]}" --dist loadfile "${stage[@]}" </dev/null
    else
        $python -m pytest $nbval "${stage[@]}" </dev/null
    fi
done
