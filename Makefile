# The two commands: `make run` serves the chat at http://localhost:8080, `make test` tests it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test conformance bench soak clean

run: $(VENV)/.runtime
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

# Tests wait on servers more than they compute: four at a time (pytest-xdist).
test: $(VENV)/.dev
	$(BIN)/python -m pytest -n 4

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

# bench/ (about 40 minutes; not part of `make test`): the frame layer against
# gevent-websocket's, the kernel's own cost of fan-out, ours against two peers under load
# (scenarios a-f) and bench/plot.png, one worker against two through Redis (v1 and v2, five
# rounds), metrics on against off (three rounds), v2 against python-socketio (c2, r100, b2,
# e2) and bench/plot-v2.png, token mode against open mode (fan-out and handshakes), the server
# API (requests/s, and beside scenario b), and the spread of connections over 4 workers.
bench: $(VENV)/.bench
	$(MAKE) -C bench .build/loadgen
	$(BIN)/python bench/protocol.py
	$(BIN)/python bench/floor.py
	$(BIN)/python bench/run.py --scenarios a,b,c,d,e,f,cl300,cl3000,cl10000
	$(BIN)/python bench/plot.py
	$(BIN)/python bench/run.py --servers ours,ours-redis --scenarios a,b,c,c2,r100 --rounds 5 --out bench/results-redis.jsonl
	$(BIN)/python bench/run.py --servers ours,ours-metrics --scenarios c --rounds 3 --out bench/results-metrics.jsonl
	$(BIN)/python bench/run.py --servers ours,socketio --scenarios c2,r100,b2,e2 --out bench/results-v2.jsonl
	$(BIN)/python bench/plot_v2.py
	$(BIN)/python bench/run.py --servers ours,ours-token --scenarios c2,r100 --rounds 3 --out bench/results-token.jsonl
	$(BIN)/python bench/run.py --servers ours,ours-token,ours-token-es256 --scenarios hs --rounds 3 --out bench/results-handshakes.jsonl
	$(BIN)/python bench/api.py
	$(BIN)/python bench/run.py --servers ours --scenarios b,bapi,bapi-lobby --rounds 3 --out bench/results-bapi.jsonl
	$(BIN)/python bench/spread.py --rounds 3

$(VENV)/.bench: bench/requirements.txt $(VENV)/.dev
	$(BIN)/pip install --quiet -r bench/requirements.txt
	touch $@

clean:
	rm -rf $(VENV)

# Autobahn|Testsuite against our WebSocket layer (needs a Python 2.7; skips without one).
conformance: $(VENV)/.dev
	$(BIN)/python tests/conformance/run.py

# A server under a churning crowd for SOAK_MINUTES (10): fails if memory, file descriptors,
# greenlets or Redis's memory grow after the warm-up, or a steady client misses a line.
SOAK_MINUTES ?= 10
soak: $(VENV)/.bench
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES)
	$(BIN)/python bench/plot_soak.py
