# The two commands of the README:
#   make run    set up .venv, install phase1-jax, train the main job on the embedded corpus
#   make test   set up .venv the same way and run the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch that these machines carry on disk; any torch >= 2.11 works for the converters.
TORCH_SPEC ?= torch==2.13.0
RUN_ARGS ?=
STAMP := $(VENV)/.phase1-jax-installed

.PHONY: run test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install --quiet -e ".[torch,test]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/phase1-jax train $(RUN_ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
