#!/bin/bash
# A real one-host Slurm cluster on localhost for the tests (Debian's slurmctld/slurmd/munge).
#
#   cluster.sh install     install the packages when missing (root + apt-get); exit 3 if impossible
#   cluster.sh start DIR   write DIR/slurm.conf, start munged, slurmctld, slurmd; wait for "idle"
#   cluster.sh stop DIR    scontrol shutdown, then end the daemons this script started
#
# Client commands need SLURM_CONF=DIR/slurm.conf. Everything (state, spool, logs, the munge
# socket and key) lives under DIR; the ports (16817/16818) are away from Slurm's defaults.
# cred_expire=10: a requeued job may start again 10 s after it stopped (Slurm's default is 120).
set -euo pipefail

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
    T=$(realpath "$1")
    mkdir -p "$T/state" "$T/spool"
    H=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemAvailable/ {print $2}' /proc/meminfo) * 8 / 10240 ))
    cat > "$T/slurm.conf" <<CONF
ClusterName=test
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$T/munge.sock,cred_expire=10
SlurmctldPort=16817
SlurmdPort=16818
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
            echo "slurm cluster up: node $H idle ($cpus CPUs, ${mem} MiB); SLURM_CONF=$T/slurm.conf"
            return 0
        fi
        sleep 0.1
    done
    echo "the Slurm node did not become idle in 30 s; see $T/ctld.log and $T/d.log" >&2
    stop "$T"
    exit 1
}

stop() {
    local T pid
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
}

case "${1:-}" in
install) install ;;
start) start "${2:?usage: cluster.sh start DIR}" ;;
stop) stop "${2:?usage: cluster.sh stop DIR}" ;;
*) echo "usage: cluster.sh install | start DIR | stop DIR" >&2; exit 2 ;;
esac
