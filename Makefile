# The series' commands. Each one first runs scripts/setup.sh, which creates .venv with
# Python 3.10 and the pinned packages when they are missing or out of date.
.PHONY: setup run run-es test lab benchmark

setup:
	@scripts/setup.sh

run: setup
	.venv/bin/python -m private_predictions.series

# The Spanish series (notebooks/es), headless.
run-es: setup
	.venv/bin/python -m private_predictions.series --language es

test: setup
	scripts/test.sh

# JupyterLab on notebooks/, its kernels' channels on Unix sockets only this user can open (scripts/lab.sh).
lab: setup
	scripts/lab.sh

# The paths side by side (benchmark.json), then the cost of each block of the network (layers.json).
benchmark: setup
	.venv/bin/python benchmarks/benchmark.py
	.venv/bin/python benchmarks/layers.py
