#!/usr/bin/env bash
# The GPU check on a bare CUDA machine (PyTorch and transformers installed, no internet), from the
# repository root with the bundle of deploy/gpu/bundle.sh in $BUNDLE: installs the bundle's wheels into
# a private directory (nothing else is installed or fetched) and runs `python -m safesteer.gpu_check`
# on the default model with the bundled run's vector and safety tokens. Extra arguments go to it.
set -euo pipefail
BUNDLE=${BUNDLE:-.gpu}
SITE=${SITE:-/tmp/safesteer-site}
PY=${PY:-python3}
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$BUNDLE"/wheels/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m safesteer.gpu_check --model "$BUNDLE"/*.gguf --run "$BUNDLE/run" "$@"
