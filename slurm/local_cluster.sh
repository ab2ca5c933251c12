#!/bin/bash
# A real one-host Slurm cluster (slurmctld + slurmd + munge on localhost) to try the slurm/
# scripts on a laptop or workstation before the real cluster; the tests use it too.
#
#   bash slurm/local_cluster.sh install        install Debian's slurmctld/slurmd/munge when missing
#                                              (root + apt-get); exit 3 if impossible
#   bash slurm/local_cluster.sh start [DIR]    write DIR/slurm.conf, start munged, slurmctld and
#                                              slurmd, wait until the node is idle
#   bash slurm/local_cluster.sh status [DIR]   is it up; the node's CPUs, memory and state; the jobs
#   eval "$(bash slurm/local_cluster.sh env [DIR])"   set SLURM_CONF in this shell
#   bash slurm/local_cluster.sh stop [DIR]     cancel its jobs, shut it down, end its daemons
#
# DIR (default: $LOCAL_CLUSTER_DIR, else ~/.cache/megatron_biomed/slurm) holds everything: the
# config, state, spool, logs, the munge socket and key. Client commands (sbatch, squeue, ...)
# need `export SLURM_CONF=DIR/slurm.conf`, which `start` prints. Ports: SLURMCTLD_PORT (default
# 16817) and SLURMD_PORT (16818), away from Slurm's own defaults, so it can run beside a real
# installation; give two other free ports to run a second one. The node has this machine's CPUs
# and 80% of its available memory, no GPUs: run the scripts with GPUS_PER_NODE=0 (gloo on CPU).
# cred_expire=10: a requeued job may start again 10 s after it stopped (Slurm's default is 120).
set -euo pipefail

DEFAULT_DIR=${LOCAL_CLUSTER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/megatron_biomed/slurm}
SLURMCTLD_PORT=${SLURMCTLD_PORT:-16817}
SLURMD_PORT=${SLURMD_PORT:-16818}

PACKAGES="slurmctld slurmd slurm-client munge"

have_all() {
    local b
    for b in slurmctld slurmd sbatch sinfo scontrol munged; do
        command -v "$b" >/dev/null || return 1
    done
}

install() {
    have_all && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "Slurm is not installed and cannot be (needs root and apt-get): $PACKAGES" >&2
        exit 3
    fi
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086  # a list of package names
    if ! apt-get install -y -q $PACKAGES >/dev/null 2>&1; then
        apt-get update -q >/dev/null 2>&1 || true
        # shellcheck disable=SC2086
        apt-get install -y -q $PACKAGES >/dev/null 2>&1 || { echo "apt-get install $PACKAGES failed" >&2; exit 3; }
    fi
    have_all || { echo "installed, but Slurm commands are still missing" >&2; exit 3; }
}

start() {
    local T H cpus mem
    mkdir -p "$1"
    T=$(realpath "$1")
    if [ -f "$T/pids" ] && SLURM_CONF="$T/slurm.conf" timeout 5 sinfo -h >/dev/null 2>&1; then
        echo "already running; export SLURM_CONF=$T/slurm.conf"
        return 0
    fi
    mkdir -p "$T/state" "$T/spool"
    H=$(hostname -s)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
    mem=$(( $(awk '/MemAvailable/ {print $2}' /proc/meminfo) * 8 / 10240 ))
    cat > "$T/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$T/munge.sock,cred_expire=10
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/ctld.log
SlurmdLogFile=$T/d.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
NodeName=$H NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
CONF
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    dd if=/dev/urandom of="$T/munge.key" bs=1024 count=1 status=none
    chmod 400 "$T/munge.key"
    export SLURM_CONF="$T/slurm.conf"
    munged --force -F -S "$T/munge.sock" --key-file="$T/munge.key" --pid-file="$T/munged.pid" \
        --log-file="$T/munged.log" --seed-file="$T/munged.seed" > "$T/munged.out" 2>&1 &
    echo $! > "$T/pids"
    for _ in $(seq 50); do [ -S "$T/munge.sock" ] && break; sleep 0.1; done
    slurmctld -D -f "$T/slurm.conf" > "$T/ctld.out" 2>&1 &
    echo $! >> "$T/pids"
    slurmd -D -f "$T/slurm.conf" > "$T/d.out" 2>&1 &
    echo $! >> "$T/pids"
    for _ in $(seq 300); do
        if [ "$(sinfo -h -o %T 2>/dev/null)" = idle ]; then
            echo "slurm cluster up: node $H idle ($cpus CPUs, ${mem} MiB, no GPUs), ports $SLURMCTLD_PORT/$SLURMD_PORT"
            echo "export SLURM_CONF=$T/slurm.conf"
            return 0
        fi
        sleep 0.1
    done
    echo "the Slurm node did not become idle in 30 s; see $T/ctld.log and $T/d.log" >&2
    stop "$T"
    exit 1
}

status() {
    local T
    T=$(realpath "$1" 2>/dev/null || echo "$1")
    if [ ! -f "$T/slurm.conf" ] || ! SLURM_CONF="$T/slurm.conf" timeout 5 sinfo -h >/dev/null 2>&1; then
        echo "not running (state directory $T)"
        return 1
    fi
    export SLURM_CONF="$T/slurm.conf"
    echo "running: export SLURM_CONF=$T/slurm.conf"
    sinfo -N -o "%N %T %c CPUs %m MiB"
    squeue
}

stop() {
    local T pid
    [ -d "$1" ] || { echo "not running (no $1)"; return 0; }
    T=$(realpath "$1")
    export SLURM_CONF="$T/slurm.conf"
    # end the jobs first: their processes would outlive the daemons (and hold their ports)
    timeout 10 scancel --full --user "$(id -un)" >/dev/null 2>&1 || true
    for _ in $(seq 100); do
        [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.2
    done
    timeout 10 scontrol shutdown >/dev/null 2>&1 || true
    [ -f "$T/pids" ] || return 0
    while read -r pid; do
        kill "$pid" 2>/dev/null || true
    done < "$T/pids"
    sleep 1
    while read -r pid; do
        kill -9 "$pid" 2>/dev/null || true
    done < "$T/pids"
    rm -f "$T/pids"
    echo "stopped"
}

case "${1:-}" in
install) install ;;
start) install && start "${2:-$DEFAULT_DIR}" ;;
status) status "${2:-$DEFAULT_DIR}" ;;
env) mkdir -p "${2:-$DEFAULT_DIR}" && echo "export SLURM_CONF=$(realpath "${2:-$DEFAULT_DIR}")/slurm.conf" ;;
stop) stop "${2:-$DEFAULT_DIR}" ;;
*) echo "usage: local_cluster.sh install | start [DIR] | status [DIR] | env [DIR] | stop [DIR]" >&2; exit 2 ;;
esac
