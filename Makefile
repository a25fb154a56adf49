# The series' commands. Each one first runs scripts/setup.sh, which creates .venv with
# Python 3.10 and the pinned packages when they are missing or out of date.
.PHONY: setup run test lab benchmark

setup:
	@scripts/setup.sh

run: setup
	.venv/bin/python -m private_predictions.series

test: setup
	scripts/test.sh

lab: setup
	.venv/bin/jupyter lab notebooks/

benchmark: setup
	.venv/bin/python benchmarks/benchmark.py
