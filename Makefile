# Two commands do all the set-up: `make demo` runs the workflow on the built-in demo scene,
# `make test` passes the tests. Both install what is missing first (scripts/setup.sh, idempotent).
VENV ?= .venv
CORES ?= 2
SNAKEMAKE = $(VENV)/bin/snakemake
PY = $(VENV)/bin/python

.PHONY: setup setup-slurm demo test test-fast bench-ingest lint lock clean

setup:
	bash scripts/setup.sh

# Slurm only: the executor plugin, kept out of the default venv (it costs every local Snakemake start
# ~9 s where a Slurm client is installed but no controller answers).
setup-slurm: setup
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-slurm.txt

demo: setup
	$(SNAKEMAKE) --profile profiles/default --cores $(CORES)

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not workflow and not slow"

bench-ingest: setup
	$(PY) benchmarks/bench_ingest.py

lint: setup
	$(SNAKEMAKE) --lint

lock:
	python3 -m venv /tmp/stfuse-lock && /tmp/stfuse-lock/bin/pip install -q -r requirements.in \
	  && { echo "# Generated lock of requirements.in (pip freeze); regenerate with: make lock"; \
	       /tmp/stfuse-lock/bin/pip freeze | sed 's/+cpu$$//'; } > requirements.txt

clean:
	rm -rf results logs benchmarks/out .snakemake
