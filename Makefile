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

# The flagship, Titans MAC, then the Llama baseline on the same steps and batches; the last lines
# are their validation losses side by side (titanforge compare).
DEMO_TRAIN ?= train.steps=40 train.global_batch_size=16 train.micro_batch_size=4 train.val_every=20 \
	train.val_batches=2 checkpoint.every=20

demo: setup
	$(VENV)/bin/titanforge prepare --out $(DEMO_DIR)/data
	$(VENV)/bin/titanforge train configs/titans-mac-tiny.yaml --nproc $(NPROC) \
		data.path=$(DEMO_DIR)/data output_dir=$(DEMO_DIR)/titans-mac-tiny $(DEMO_TRAIN)
	$(VENV)/bin/titanforge train configs/llama-tiny.yaml --nproc $(NPROC) \
		data.path=$(DEMO_DIR)/data output_dir=$(DEMO_DIR)/llama-tiny $(DEMO_TRAIN)
	$(VENV)/bin/titanforge compare $(DEMO_DIR)/titans-mac-tiny $(DEMO_DIR)/llama-tiny

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
