# Two commands: `make sweep` (the default sweep) and `make test` (the whole suite). Both create .venv first.
# CPU machines get torch==2.13.0 (a CPU build where one is provided locally); machines with nvidia-smi get the
# regular PyPI torch (CUDA). Override with `make TORCH=... test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.13" || echo "torch==2.13.0")
ARGS  ?=

.PHONY: install sweep test test-fast lint format clean bench-peers

$(VENV)/.installed: pyproject.toml requirements-lock.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	grep -v '^torch==' requirements-lock.txt > $(VENV)/constraints.txt  # the lock minus its CPU-only torch build
	$(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e ".[test]"  # the versions the suite passed with
	touch $@

install: $(VENV)/.installed

sweep: install            ## python tune_lora.py with configs/default.yaml (pass ARGS="train.lr=..." to override)
	$(PY) tune_lora.py $(ARGS)

test: install             ## every test tier: config, unit, end-to-end sweeps, cluster + S3
	$(PY) -m pytest -q -ra -n 2 --dist loadfile --durations=25 $(ARGS)  # 2 workers, a file each (tests/conftest.py)

test-fast: install        ## unit tiers only
	$(PY) -m pytest -q -m "not slow and not cluster" $(ARGS)

# The peer methods that need numpy < 2 (syne-tune 0.14.2, dehb 0.1.2) in their own environment, .venv-peers
# (bench/peers_env.sh, bench/peers-lock.txt): bench/replay.py runs them as a subprocess; lorahpo never imports them.
.venv-peers/.installed: bench/peers-lock.txt bench/peers_env.sh
	bash bench/peers_env.sh .venv-peers

bench-peers: .venv-peers/.installed  ## the peers' own environment for bench/replay.py (67-77 s here)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .venv-peers .pytest_cache .ruff_cache
