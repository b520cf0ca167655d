#!/usr/bin/env bash
# One node's part of deploy/slurm/safesteer.sbatch; srun starts it, one task per node.
#
#   ray-node.sh head             start the Ray head here (blocks); write its GCS address to
#                                $SAFESTEER_RAY_ADDRESS_FILE
#   ray-node.sh worker           join $SAFESTEER_RAY_ADDRESS as a worker node (blocks)
#   ray-node.sh driver ARGS...   wait until $SAFESTEER_NUM_NODES nodes joined, then run
#                                `python -m safesteer.run cluster.address=auto ARGS...`
#   ray-node.sh stop             stop this job's Ray processes on this node
#
# Output goes to $SAFESTEER_LOG_DIR/ray-<role>-<Slurm node name>.log (driver.log for the driver).
#
# head/worker stop Ray on SIGTERM/SIGINT/SIGHUP (scancel, time limit, srun teardown) and on exit.
# "Stop" is scoped: every process of this job's Ray carries SAFESTEER_RAY_OWNER=<job id>:<temp dir> in
# its environment (set on `ray start`, inherited by gcs_server, raylet, dashboard, workers and their
# children, even re-parented ones), and only those are signalled: SIGTERM, then SIGKILL after
# $SAFESTEER_RAY_STOP_GRACE_S. `ray stop --force` is NOT scoped (it kills every Ray process of the user
# on the node, other jobs' included), so it runs only with SAFESTEER_RAY_STOP=force.
# The parameters are documented in safesteer.sbatch, which exports them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
role="${1:?usage: ray-node.sh head|worker|driver|stop}"
shift

tmpdir="${SAFESTEER_RAY_TMPDIR:-/tmp/ray-${SLURM_JOB_ID:-local}}"
owner="${SLURM_JOB_ID:-local}:$tmpdir"
stopping="$tmpdir/safesteer-stopping"
grace="${SAFESTEER_RAY_STOP_GRACE_S:-10}"
node="${SLURMD_NODENAME:-$(hostname -s)}"

say() { echo "[$(date '+%F %T')] ray-node.sh $role@$node: $*" >&2; }

# Per-node logs on shared storage, named by the Slurm node name (srun's %N is the host name).
if [ -n "${SAFESTEER_LOG_DIR:-}" ]; then
    mkdir -p "$SAFESTEER_LOG_DIR"
    if [ "$role" = driver ]; then
        exec >> "$SAFESTEER_LOG_DIR/driver.log" 2>&1
    else
        exec >> "$SAFESTEER_LOG_DIR/ray-$role-$node.log" 2>&1
    fi
fi

setup_env() {
    if [ -n "${SAFESTEER_VENV:-}" ]; then
        [ -x "$SAFESTEER_VENV/bin/python" ] || { say "error: SAFESTEER_VENV=$SAFESTEER_VENV has no bin/python"; exit 2; }
        export VIRTUAL_ENV="$SAFESTEER_VENV"
        export PATH="$SAFESTEER_VENV/bin:$PATH"
    fi
    if [ -n "${SAFESTEER_SETUP:-}" ]; then
        eval "$SAFESTEER_SETUP"
    fi
}

# PIDs of this job's Ray processes on this node (by the environment marker; zombies have none).
owned_pids() {
    local f pid
    grep -lzxF "SAFESTEER_RAY_OWNER=$owner" /proc/[0-9]*/environ 2> /dev/null | while read -r f; do
        pid="${f#/proc/}"
        pid="${pid%/environ}"
        [ "$pid" != "$$" ] && echo "$pid"
    done || true
}

stop_ray() {
    local pids left
    # Marks the stop as deliberate: `ray start --block` may exit 1 instead of 143 when its raylet dies
    # of the same SIGTERM before it does ("subprocess exited unexpectedly"); run_ray reads the mark.
    [ -d "$tmpdir" ] && { : > "$stopping" 2> /dev/null || true; }
    pids="$(owned_pids)"
    if [ -n "$pids" ]; then
        say "stopping $(echo "$pids" | wc -w) Ray processes (SIGTERM, SIGKILL after ${grace}s)"
        # shellcheck disable=SC2086  # word-splitting the PID list is intended
        kill -TERM $pids 2> /dev/null || true
        for _ in $(seq $((grace * 5))); do
            left="$(owned_pids)"
            [ -z "$left" ] && break
            sleep 0.2
        done
        left="$(owned_pids)"
        if [ -n "$left" ]; then
            say "SIGKILL to $(echo "$left" | wc -w) Ray processes still alive"
            # shellcheck disable=SC2086
            kill -KILL $left 2> /dev/null || true
        fi
    fi
    if [ "${SAFESTEER_RAY_STOP:-scoped}" = force ] && command -v ray > /dev/null; then
        say "ray stop --force (every Ray process of $(id -un) on this node)"
        ray stop --force > /dev/null 2>&1 || true
    fi
    if [ "${SAFESTEER_COPY_RAY_LOGS:-0}" = 1 ] && [ -n "${SAFESTEER_LOG_DIR:-}" ] && [ -d "$tmpdir/session_latest/logs" ]; then
        mkdir -p "$SAFESTEER_LOG_DIR/ray-session-$node"
        cp -r "$tmpdir/session_latest/logs/." "$SAFESTEER_LOG_DIR/ray-session-$node/" 2> /dev/null || true
    fi
}

# Run `ray start ... --block` in the background, marked as this job's, and wait for it; stop on signals.
run_ray() {
    local pid rc=0
    trap 'say "signal: stopping Ray"; stop_ray; exit 143' TERM INT HUP
    trap 'stop_ray' EXIT
    rm -f "$stopping"
    env SAFESTEER_RAY_OWNER="$owner" ray start "$@" --block &
    pid=$!
    if [ "$role" = head ]; then
        local file="$tmpdir/ray_current_cluster"
        for _ in $(seq $((${SAFESTEER_RAY_START_TIMEOUT_S:-180} * 2))); do
            [ -s "$file" ] && break
            kill -0 "$pid" 2> /dev/null || break
            sleep 0.5
        done
        if [ -s "$file" ]; then
            cp "$file" "$SAFESTEER_RAY_ADDRESS_FILE.tmp"
            mv "$SAFESTEER_RAY_ADDRESS_FILE.tmp" "$SAFESTEER_RAY_ADDRESS_FILE"
            say "head up at $(cat "$file")"
        else
            say "error: the Ray head did not come up (no $file)"
        fi
    fi
    wait "$pid" || rc=$?
    case "$rc" in
        0 | 137 | 143)
            # SIGTERM/SIGKILL: the scoped stop of a teardown (or the OOM killer: see the driver's log).
            say "ray start ended (status $rc)"
            return 0
            ;;
    esac
    if [ -e "$stopping" ]; then
        say "ray start ended (status $rc, during this job's scoped stop)"
        return 0
    fi
    say "error: ray start exited with status $rc"
    return "$rc"
}

ray_start_args() {
    args=(--temp-dir="$tmpdir" --disable-usage-stats)
    local cpus="${SAFESTEER_RAY_NUM_CPUS:-${SLURM_CPUS_ON_NODE:-}}"
    [ -n "$cpus" ] && args+=(--num-cpus="$cpus")
    [ -n "${SAFESTEER_RAY_NUM_GPUS:-}" ] && args+=(--num-gpus="$SAFESTEER_RAY_NUM_GPUS")
    [ -n "${SAFESTEER_RAY_RESOURCES:-}" ] && args+=(--resources="$SAFESTEER_RAY_RESOURCES")
    [ -n "${SAFESTEER_RAY_OBJECT_STORE_BYTES:-}" ] && args+=(--object-store-memory="$SAFESTEER_RAY_OBJECT_STORE_BYTES")
    local extra=() role_extra=()
    read -r -a extra <<< "${SAFESTEER_RAY_NODE_ARGS:-}"
    if [ "$role" = head ]; then
        read -r -a role_extra <<< "${SAFESTEER_RAY_HEAD_ARGS:-}"
    else
        read -r -a role_extra <<< "${SAFESTEER_RAY_WORKER_ARGS:-}"
    fi
    args+=(${extra[@]+"${extra[@]}"} ${role_extra[@]+"${role_extra[@]}"})
    return 0
}

case "$role" in
    head)
        setup_env
        : "${SAFESTEER_RAY_ADDRESS_FILE:?}"
        ray_start_args
        args+=(--head --port="${SAFESTEER_RAY_PORT:-6379}"
            --dashboard-host="${SAFESTEER_RAY_DASHBOARD_HOST:-127.0.0.1}" --dashboard-port="${SAFESTEER_RAY_DASHBOARD_PORT:-8265}"
            --ray-client-server-port="${SAFESTEER_RAY_CLIENT_PORT:-10001}")
        [ -n "${SAFESTEER_RAY_HEAD_IP:-}" ] && args+=(--node-ip-address="$SAFESTEER_RAY_HEAD_IP")
        mkdir -p "$tmpdir"
        rm -f "$tmpdir/ray_current_cluster"
        say "ray start ${args[*]}"
        run_ray "${args[@]}"
        ;;
    worker)
        setup_env
        : "${SAFESTEER_RAY_ADDRESS:?}"
        ray_start_args
        args+=(--address="$SAFESTEER_RAY_ADDRESS")
        say "ray start ${args[*]}"
        run_ray "${args[@]}"
        ;;
    driver)
        setup_env
        : "${SAFESTEER_RAY_ADDRESS:?}" "${SAFESTEER_OUTPUT_DIR:?}"
        export RAY_ADDRESS="$SAFESTEER_RAY_ADDRESS"
        cd "${SAFESTEER_DIR:-.}"
        python "$here/wait_for_ray.py" --nodes "${SAFESTEER_NUM_NODES:-1}" --timeout "${SAFESTEER_RAY_JOIN_TIMEOUT_S:-300}"
        say "python -m safesteer.run cluster.address=auto hydra.run.dir=$SAFESTEER_OUTPUT_DIR $*"
        exec python -m safesteer.run cluster.address=auto "hydra.run.dir=$SAFESTEER_OUTPUT_DIR" "$@"
        ;;
    stop)
        stop_ray
        ;;
    *)
        say "usage: ray-node.sh head|worker|driver|stop"
        exit 2
        ;;
esac
