# megalong: `make quickstart` runs the whole LongLoRA road on the embedded default; `make test` the tests.
# Both create .venv and install everything on first use (torch first: a plain `pip install torch`
# on a CPU box would pull a multi-GB CUDA build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install -q -c requirements/constraints.txt

.PHONY: install quickstart test test-fast lint clean-shm

$(VENV)/.installed: setup.py requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	bash launch/quickstart.sh

test: install
	$(PY) -m pytest -q --durations=25

test-fast: install
	$(PY) -m pytest -q tests/unit

lint: install
	$(VENV)/bin/ruff check megalong launch tools tests

clean-shm:
	rm -f /dev/shm/deepspeed_allreduce_buffer_*
