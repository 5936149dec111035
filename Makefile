# The two commands in README.md. Both create .venv/ themselves (launch/bootstrap.py).
PY ?= python3
VENV ?= .venv
RUN := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
NPROC ?= 2
PYTEST_ARGS ?=

.PHONY: setup lock demo test bench clean

setup:
	@$(PY) launch/bootstrap.py

demo: setup
	$(VENV)/bin/titanforge prepare --out $(DEMO_DIR)/data
	$(VENV)/bin/titanforge train configs/llama-tiny.yaml --nproc $(NPROC) \
		data.path=$(DEMO_DIR)/data output_dir=$(DEMO_DIR)

test: setup
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(RUN) -P -m pytest -q $(PYTEST_ARGS)

# Newest versions in range -> locks/py3.X.txt, then the test suite against them (commit the lock
# when it passes).
lock:
	@$(PY) launch/bootstrap.py --lock
	$(MAKE) test

# Benchmarks also install their peers (the bench extra, at the locked versions).
bench:
	@TITANFORGE_EXTRAS=dev,bench $(PY) launch/bootstrap.py
	$(RUN) bench/run_all.py

clean:
	rm -rf runs .pytest_cache
