# The two commands in README.md. Both create .venv/ themselves (launch/bootstrap.py).
PY ?= python3
VENV ?= .venv
RUN := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
NPROC ?= 2
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup:
	@$(PY) launch/bootstrap.py

demo: setup
	$(RUN) -m titanforge.launch.cli prepare --out $(DEMO_DIR)/data
	$(RUN) -m titanforge.launch.cli train configs/llama-tiny.yaml --nproc $(NPROC) \
		data.path=$(DEMO_DIR)/data output_dir=$(DEMO_DIR)

test: setup
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(RUN) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(RUN) bench/run_all.py

clean:
	rm -rf runs .pytest_cache
