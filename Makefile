# The two commands: `make run` serves the chat at http://localhost:8080, `make test` tests it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test conformance clean

run: $(VENV)/.runtime
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

test: $(VENV)/.dev
	$(BIN)/python -m pytest

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamp files: reinstall only when the requirements change.
$(VENV)/.runtime: requirements.txt | $(VENV)/bin/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

clean:
	rm -rf $(VENV)

# Autobahn|Testsuite against our WebSocket layer (needs a Python 2.7; skips without one).
conformance: $(VENV)/.dev
	$(BIN)/python tests/conformance/run.py
