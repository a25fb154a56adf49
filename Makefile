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

# Jupyter refuses to run as root (containers, many cloud machines) unless told it may. Kernels talk to
# JupyterLab over Unix sockets in this user's own runtime folder, not TCP on loopback: no other local
# user can reach them, and a kernel has no "running over TCP without encryption" warning to print.
lab: setup
	.venv/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) --KernelManager.transport=ipc notebooks/

benchmark: setup
	.venv/bin/python benchmarks/benchmark.py
