# tcpacct — the two commands a user needs: `sudo make run` and `sudo make test`.
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup run test test-unit test-privileged test-e2e test-vm lint bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/tcpacct run $(ARGS)

lint: setup
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/lint-imports

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-privileged: setup
	$(PY) -m pytest -q -m "privileged and not e2e" tests/privileged

test-e2e: setup
	$(PY) -m pytest -q -rs tests/e2e

# Debian bookworm's stock 6.1 kernel under qemu (fentry, kprobe, auto); see docs/vm.md.
test-vm: setup
	$(PY) -m pytest -q -m vm tests/vm

test: setup lint
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
