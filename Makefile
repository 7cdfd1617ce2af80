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

$(RUNS)/shapes_classifier/ckpt.pt: | $(BIN)/.installed
	$(BIN)/python -m train.classifier --config configs/shapes/classifier.yaml

demo: $(BIN)/.installed $(RUNS)/shapes_classifier/ckpt.pt
	$(BIN)/python -m train.diffusion --config configs/shapes/diffusion_pixel.yaml train.resume=auto
	$(BIN)/python -m sample --ckpt $(RUNS)/diffusion_pixel/ckpt.pt --prompts-file configs/shapes/demo_prompts.txt \
		--n 8 --sampler ddim --steps 50 --guidance 3 --seed 0 --out $(RUNS)/demo/samples.png --overwrite
	$(BIN)/python -m metrics.prompt_accuracy --ckpt $(RUNS)/diffusion_pixel/ckpt.pt \
		--classifier $(RUNS)/shapes_classifier/ckpt.pt --n 4 --steps 50 --guidance 3 \
		--out $(RUNS)/demo/prompt_accuracy.json

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -n 2 -q tests

clean:
	rm -rf $(RUNS) .pytest_cache
