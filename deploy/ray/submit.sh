#!/usr/bin/env bash
# Submit a SafeSteer run to a running Ray cluster with `ray job submit`.
#
#   RAY_ADDRESS=http://HEAD:8265 SAFESTEER_OUTPUT_DIR=/shared/safesteer/run-1 \
#       deploy/ray/submit.sh +experiment=smoke learner.world_size=4 rollout.num_gpus=1
#
# Arguments are Hydra overrides of `python -m safesteer.run`; the script adds `cluster.address=auto`
# (the driver attaches to the cluster the job runs on) and `hydra.run.dir=$SAFESTEER_OUTPUT_DIR`.
# The driver places rollout, teacher and learner actors with one placement group; it gives up after
# `cluster.placement_timeout_s` (default 120), naming the missing resources, if the cluster is too small.
#
# Parameters (environment variables):
#   RAY_ADDRESS            the cluster's dashboard (job server) address, e.g. http://10.0.0.1:8265
#                          (required; `ray job submit` reads it).
#   SAFESTEER_OUTPUT_DIR   absolute run directory on storage every node and you can read (required).
#                          Set SAFESTEER_CACHE for the cluster (the `ray start` environment) to shared
#                          storage as well: the driver resolves model.path there and actors load it.
#   SAFESTEER_PYTHON       interpreter of the entrypoint on the cluster (default: python, i.e. the one
#                          first on PATH of the environment `ray start` ran in).
#   SAFESTEER_RAY          the `ray` CLI used here (default: ray).
#   SAFESTEER_WORKING_DIR  the checkout to upload (default: this repository).
#   SAFESTEER_RUNTIME_ENV  runtime env YAML (default: deploy/ray/runtime_env.yaml: upload excludes).
#   SAFESTEER_JOB_ID       submission id (default: safesteer-<date>-<random>); query it with
#                          `ray job status/logs/stop <id>`.
#   SAFESTEER_SUBMIT_ARGS  extra `ray job submit` options, word-split, e.g. "--no-wait" or
#                          "--entrypoint-num-cpus=1".
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address, e.g. http://HEAD:8265}"
: "${SAFESTEER_OUTPUT_DIR:?set SAFESTEER_OUTPUT_DIR to an absolute run directory on shared storage}"
case "$SAFESTEER_OUTPUT_DIR" in
    /*) ;;
    *) echo "error: SAFESTEER_OUTPUT_DIR=$SAFESTEER_OUTPUT_DIR must be an absolute path" >&2; exit 2 ;;
esac
python_bin="${SAFESTEER_PYTHON:-python}"
ray_bin="${SAFESTEER_RAY:-ray}"
working_dir="${SAFESTEER_WORKING_DIR:-$repo}"
runtime_env="${SAFESTEER_RUNTIME_ENV:-$here/runtime_env.yaml}"
job_id="${SAFESTEER_JOB_ID:-safesteer-$(date +%Y%m%d-%H%M%S)-$RANDOM}"
read -r -a submit_args <<< "${SAFESTEER_SUBMIT_ARGS:-}"

# `ray job submit` shell-quotes each word of the entrypoint (shlex.join) and runs it through a shell.
entrypoint=("$python_bin" -m safesteer.run cluster.address=auto "hydra.run.dir=$SAFESTEER_OUTPUT_DIR" "$@")

echo "submitting $job_id to $RAY_ADDRESS: ${entrypoint[*]}" >&2
exec "$ray_bin" job submit \
    --address "$RAY_ADDRESS" \
    --submission-id "$job_id" \
    --working-dir "$working_dir" \
    --runtime-env "$runtime_env" \
    ${submit_args[@]+"${submit_args[@]}"} \
    -- "${entrypoint[@]}"
