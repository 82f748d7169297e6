# Two entry points: `make demo` and `make test`. Each creates the venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
# the CPU wheel on these machines; GPU users: make TORCH_SPEC='torch>=2.4' ...
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.gptctl-installed

# DeepSpeed's JIT-built op is cached per venv under ~/.cache/gptctl/torch_extensions/
# (infra/ray_env.py); set TORCH_EXTENSIONS_DIR to override.
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gptctl demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo_output .pytest_cache
