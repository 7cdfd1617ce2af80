# Two commands on a fresh machine:
#   make demo   train the tiny models on the built-in shapes and sample from them
#   make test   run the test suite
# Both create .venv and install what they need first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNS   := runs

.PHONY: demo test install clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=25.1"
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed pyproject.toml
	$(BIN)/python -m pip install -q --group test
	touch $@

install: $(BIN)/.installed

# every stage (classifier, judge CLIP, VAE, latent U-Net, samples, metrics) is a command of its own that
# sample/demo.py calls in turn; finished stages are skipped on a second run
demo: $(BIN)/.installed
	$(BIN)/python -m sample.demo --runs $(RUNS)

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -n 2 -q tests

clean:
	rm -rf $(RUNS) .pytest_cache
