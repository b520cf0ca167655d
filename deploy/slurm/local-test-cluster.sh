#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for testing deploy/slurm/safesteer.sbatch
# (tests/test_deploy.py calls it). Needs root. Idempotent.
#
#   deploy/slurm/local-test-cluster.sh start    # install (apt-get) if missing, configure, start, wait
#   deploy/slurm/local-test-cluster.sh status   # exit 0 when the controller answers and all nodes are up
#   deploy/slurm/local-test-cluster.sh stop     # stop slurmd and slurmctld (munged is left running)
#   deploy/slurm/local-test-cluster.sh env      # print the `export SLURM_CONF=...` line to use the cluster
#   deploy/slurm/local-test-cluster.sh nodes    # print the node names
#
# SAFESTEER_SLURM_NODES nodes (default 2), all on this host: each is a slurmd of its own (`slurmd -N`)
# claiming all the host's CPUs and memory, named <host>-n1, <host>-n2, ... (with 1 node: just <host>).
# Multi-node fan-out (srun over nodes, a Ray head plus Ray workers) therefore runs for real, but every
# "node" shares this host's network address, /tmp and process table. One partition `debug`, munge
# authentication, no accounting database (sacct is not available: job end states go to
# $SAFESTEER_SLURM_DIR/jobcomp.log and stay in `scontrol show job` for MinJobAge=3600 s),
# proctrack/linuxproc and task/none (cgroups often do not work inside containers). The configuration
# lives in $SAFESTEER_SLURM_DIR, never in /etc/slurm: pass SLURM_CONF=$SAFESTEER_SLURM_DIR/slurm.conf
# to the Slurm commands.
#
# Parameters (environment variables):
#   SAFESTEER_SLURM_DIR        state, spool, logs and slurm.conf (default /tmp/safesteer-slurm)
#   SAFESTEER_SLURM_NODES      number of nodes (slurmd daemons) on this host (default 2)
#   SAFESTEER_SLURMCTLD_PORT   controller port (default 6817)
#   SAFESTEER_SLURMD_PORT      first node daemon port; node i listens on this + i - 1 (default 6818)
#   SAFESTEER_SLURM_KILLWAIT   seconds between SIGTERM and SIGKILL when a job is cancelled (default 30)
set -euo pipefail

dir="${SAFESTEER_SLURM_DIR:-/tmp/safesteer-slurm}"
num_nodes="${SAFESTEER_SLURM_NODES:-2}"
ctld_port="${SAFESTEER_SLURMCTLD_PORT:-6817}"
slurmd_port="${SAFESTEER_SLURMD_PORT:-6818}"
killwait="${SAFESTEER_SLURM_KILLWAIT:-30}"
conf="$dir/slurm.conf"
host="$(hostname -s)"
export SLURM_CONF="$conf"

log() { echo "local-test-cluster: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

install_packages() {
    local missing=() bin
    for bin in sbatch srun scontrol slurmctld slurmd munged; do
        command -v "$bin" > /dev/null || missing+=("$bin")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]} and not root: install slurm-wlm and munge"
    command -v apt-get > /dev/null || die "missing ${missing[*]} and no apt-get: install slurm-wlm and munge"
    log "installing slurm-wlm and munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q > "$dir/apt.log" 2>&1 || {
        tail -n 20 "$dir/apt.log" >&2
        die "apt-get update failed"
    }
    apt-get install -y -q --no-install-recommends slurm-wlm munge >> "$dir/apt.log" 2>&1 || {
        tail -n 20 "$dir/apt.log" >&2
        die "apt-get install slurm-wlm munge failed"
    }
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2> /dev/null; }

start_munge() {
    if munge -n 2> /dev/null | unmunge > /dev/null 2>&1; then
        return 0
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    if id munge > /dev/null 2>&1; then
        chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
        chmod 0700 /etc/munge
        chmod 0400 /etc/munge/munge.key
        chmod 0755 /run/munge
        runuser -u munge -- munged
    else
        munged --force
    fi
    for _ in $(seq 50); do
        munge -n 2> /dev/null | unmunge > /dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

node_names() {
    if [ "$num_nodes" -eq 1 ]; then
        echo "$host"
    else
        for i in $(seq "$num_nodes"); do echo "$host-n$i"; done
    fi
}

write_conf() { # returns 1 when the configuration is unchanged
    local hw nodes_conf="" i=0 name tmp
    # The hardware as slurmd sees it (CPUs, sockets, cores, threads, memory), without the node name.
    hw="$(slurmd -C | head -n 1)"
    case "$hw" in
        NodeName=*) hw="${hw#NodeName=* }" ;;
        *) die "unexpected output of slurmd -C: $hw" ;;
    esac
    for name in $(node_names); do
        nodes_conf+="NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$((slurmd_port + i)) $hw"
        nodes_conf+=$' State=UNKNOWN\n'
        i=$((i + 1))
    done
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    tmp="$conf.tmp.$$"
    {
        echo "# Written by deploy/slurm/local-test-cluster.sh: $num_nodes node(s) on one host."
        echo "ClusterName=safesteer-local"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=$ctld_port"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "StateSaveLocation=$dir/state"
        echo "SlurmdSpoolDir=$dir/spool/%n"
        echo "SlurmctldPidFile=$dir/slurmctld.pid"
        echo "SlurmdPidFile=$dir/slurmd-%n.pid"
        echo "SlurmctldLogFile=$dir/log/slurmctld.log"
        echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SwitchType=switch/none"
        echo "MpiDefault=none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/filetxt"
        echo "JobCompLoc=$dir/jobcomp.log"
        echo "SchedulerType=sched/backfill"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "ReturnToService=2"
        echo "KillWait=$killwait"
        echo "MinJobAge=3600"
        echo "InactiveLimit=0"
        echo "SlurmctldTimeout=30"
        echo "SlurmdTimeout=60"
        printf '%s' "$nodes_conf"
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > "$tmp"
    if [ -f "$conf" ] && cmp -s "$tmp" "$conf"; then
        rm -f "$tmp"
        return 1
    fi
    mv "$tmp" "$conf"
    return 0
}

node_states() { sinfo -h -N -o '%N %T' 2> /dev/null; } # "name state" per node

status() {
    local name state up=0
    [ -f "$conf" ] || return 1
    scontrol ping 2> /dev/null | grep -q 'is UP' || return 1
    while read -r name state; do
        case "$state" in
            idle* | mixed* | allocated* | completing*) up=$((up + 1)) ;;
        esac
    done < <(node_states)
    [ "$up" -eq "$num_nodes" ]
}

start() {
    local name state
    mkdir -p "$dir"
    install_packages
    start_munge
    if write_conf; then
        log "configuration written to $conf"
        stop # daemons of an older configuration, if any
    fi
    if ! pid_alive "$dir/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld -f "$conf" || die "slurmctld failed to start (see $dir/log/slurmctld.log)"
    fi
    for name in $(node_names); do
        if ! pid_alive "$dir/slurmd-$name.pid"; then
            log "starting slurmd for node $name"
            mkdir -p "$dir/spool/$name"
            slurmd -f "$conf" -N "$name" || die "slurmd $name failed to start (see $dir/log/slurmd-$name.log)"
        fi
    done
    for _ in $(seq 120); do
        if status; then
            log "up: $(node_states | tr '\n' ' ')"
            return 0
        fi
        while read -r name state; do
            case "$state" in
                down* | drain* | fail*) scontrol update NodeName="$name" State=RESUME > /dev/null 2>&1 || true ;;
            esac
        done < <(node_states)
        sleep 0.5
    done
    tail -n 5 "$dir"/log/*.log >&2 || true
    die "the cluster did not come up within 60 s (nodes: $(node_states | tr '\n' ' '))"
}

stop_pid() {
    local pidfile="$1" pid
    pid_alive "$pidfile" || return 0
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2> /dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2> /dev/null || return 0
        sleep 0.2
    done
    kill -KILL "$pid" 2> /dev/null || true
}

stop() {
    local f
    log "stopping slurmd and slurmctld"
    for f in "$dir"/slurmd*.pid; do
        if [ -e "$f" ]; then stop_pid "$f"; fi
    done
    stop_pid "$dir/slurmctld.pid"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$conf" ;;
    nodes) node_names ;;
    *) die "usage: $0 start|stop|status|env|nodes" ;;
esac
