#!/bin/bash
# A real Slurm cluster on this one machine (slurmctld + slurmd + munge) to try the slurm/ scripts
# on a laptop or workstation before the real cluster; the tests use it too.
#
#   bash slurm/local_cluster.sh install               install Debian's slurmctld/slurmd/munge when
#                                                     missing (root + apt-get); exit 3 if impossible
#   bash slurm/local_cluster.sh start [DIR] [--nodes N]
#                                                     write DIR/slurm.conf, start munged, slurmctld
#                                                     and N slurmd (default 1), wait until all are idle
#   bash slurm/local_cluster.sh status [DIR]          is it up; each node's address, CPUs, memory, state; the jobs
#   eval "$(bash slurm/local_cluster.sh env [DIR])"   set SLURM_CONF in this shell
#   bash slurm/local_cluster.sh kill-node I [DIR]     node I crashes: its slurmd and every process on it are killed
#   bash slurm/local_cluster.sh start-node I [DIR]    node I boots again (its slurmd registers, the node returns)
#   bash slurm/local_cluster.sh stop [DIR]            cancel its jobs, shut it down, end its daemons, and
#                                                     remove its namespaces, bridge and mounts
#
# DIR (default: $LOCAL_CLUSTER_DIR, else ~/.cache/megatron_biomed/slurm) holds everything: the
# config, state, spool, logs, the munge socket and key. Client commands (sbatch, squeue, ...)
# need `export SLURM_CONF=DIR/slurm.conf`, which `start` prints. Ports: SLURMCTLD_PORT (default
# 16817) and SLURMD_PORT (16818), away from Slurm's own defaults, so it can run beside a real
# installation; give two other free ports to run a second one.
#
# One node (the default) is this host itself, on 127.0.0.1. With --nodes N (N >= 2) every node
# is a network namespace with its own address and hostname (node1 .. nodeN, SUBNET.11 ..
# SUBNET.(10+N)), joined by a bridge where the controller listens on SUBNET.1, as separate
# machines are; the filesystem is shared, as a cluster's is. SUBNET (default 10.231.<port % 250>,
# a /24) must be unused on this machine; only addresses created inside the cluster's own
# namespaces and bridge are ever used. Needs CAP_NET_ADMIN (root on a machine or VM): where that
# is missing it says so in one line and exits 4.
# Every node has this machine's CPUs and 80% of its available memory divided among the nodes, no
# GPUs: run the scripts with GPUS_PER_NODE=0 (gloo on CPU).
# cred_expire=10 and bf_interval=1,sched_interval=2: a requeued job may start again about 11 s
# after it stopped (Slurm's defaults: two minutes or more). SlurmdTimeout=10: a node that stops
# answering is marked DOWN after 10 s (Slurm's default: 300 s).
set -euo pipefail

DEFAULT_DIR=${LOCAL_CLUSTER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/megatron_biomed/slurm}
SLURMCTLD_PORT=${SLURMCTLD_PORT:-16817}
SLURMD_PORT=${SLURMD_PORT:-16818}

PACKAGES="slurmctld slurmd slurm-client munge"

die() { echo "local_cluster.sh: $1" >&2; exit "${2:-1}"; }

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

# Names of this cluster's namespaces and links carry its controller port, so two clusters on
# different ports never touch each other's (later commands read the port back from DIR/network).
ns_name() { echo "mbslurm${SLURMCTLD_PORT}n$1"; }
bridge_name() { echo "mbs${SLURMCTLD_PORT}br"; }
veth_name() { echo "mbs${SLURMCTLD_PORT}v$1"; }
read_network() {  # DIR: the node count, and the port the names were made with
    local n=1 subnet port
    if [ -f "$1/network" ]; then read -r n subnet port < "$1/network"; SLURMCTLD_PORT=${port:-$SLURMCTLD_PORT}; fi
    echo "$n"
}

can_make_namespaces() {  # one line on stderr and false when this machine will not let us
    local probe err
    if ! command -v ip >/dev/null || ! command -v nsenter >/dev/null || ! command -v unshare >/dev/null; then
        echo "local_cluster.sh: --nodes $NODES: needs ip (iproute2), nsenter and unshare (util-linux); install them" >&2
        return 1
    fi
    probe="mbprobe$$"
    if ! err=$(ip link add "$probe" type bridge 2>&1); then
        echo "local_cluster.sh: --nodes $NODES: needs CAP_NET_ADMIN to create network namespaces and a bridge (ip link add: ${err##*: }); run it as root on a machine or VM, or start one node without --nodes" >&2
        return 1
    fi
    ip link del "$probe"
}

node_launch() {  # T I: boot node I: its slurmd in its namespace, under its own hostname
    local T=$1 i=$2
    # Not `ip netns exec`: it remounts /sys, and slurmd then finds no cgroup filesystem.
    nsenter --net="/run/netns/$(ns_name "$i")" unshare --mount --uts \
        sh -c "mount --bind '$T/hosts' /etc/hosts && hostname node$i && exec slurmd -D -N node$i -f '$T/slurm.conf'" \
        > "$T/d.node$i.out" 2>&1 &
    echo "$!" > "$T/node$i.pid"
}

start() {
    local T H cpus mem n i ctl_addr nodes_conf subnet
    mkdir -p "$1"
    T=$(realpath "$1")
    if [ -f "$T/pids" ] && SLURM_CONF="$T/slurm.conf" timeout 5 sinfo -h >/dev/null 2>&1; then
        echo "already running; export SLURM_CONF=$T/slurm.conf"
        return 0
    fi
    n=$NODES
    mkdir -p "$T/state" "$T/spool"
    H=$(hostname -s)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
    mem=$(( $(awk '/MemAvailable/ {print $2}' /proc/meminfo) * 8 / 10240 / n ))
    if [ "$n" -eq 1 ]; then
        ctl_addr=127.0.0.1
        nodes_conf="NodeName=$H NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP"
    else
        can_make_namespaces || exit 4
        subnet=${SUBNET:-10.231.$((SLURMCTLD_PORT % 250))}
        if ip -o -4 addr show | grep -q " ${subnet//./\\.}\."; then
            die "SUBNET $subnet.0/24 is already in use on this machine (ip addr); set SUBNET to an unused one, e.g. SUBNET=10.232.7"
        fi
        ctl_addr=$subnet.1
        nodes_conf=""
        printf '127.0.0.1 localhost\n%s %s\n' "$ctl_addr" "$H" > "$T/hosts"
        for i in $(seq "$n"); do
            nodes_conf+="NodeName=node$i NodeAddr=$subnet.$((10 + i)) NodeHostname=node$i CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
            echo "$subnet.$((10 + i)) node$i" >> "$T/hosts"
        done
        nodes_conf+="PartitionName=debug Nodes=node[1-$n] Default=YES MaxTime=INFINITE State=UP"
        # `ip netns add` makes /run/netns a mount when it is not one; stop undoes only that
        mountpoint -q /run/netns 2>/dev/null || echo 1 > "$T/netns_mount_ours"
        ip link add "$(bridge_name)" type bridge
        echo "$n $subnet $SLURMCTLD_PORT" > "$T/network"
        ip addr add "$ctl_addr/24" dev "$(bridge_name)"
        ip link set "$(bridge_name)" up
        for i in $(seq "$n"); do
            ip netns add "$(ns_name "$i")"
            ip link add "$(veth_name "$i")" type veth peer name eth0 netns "$(ns_name "$i")"
            ip link set "$(veth_name "$i")" master "$(bridge_name)" up
            ip -n "$(ns_name "$i")" addr add "$subnet.$((10 + i))/24" dev eth0
            ip -n "$(ns_name "$i")" link set eth0 up
            ip -n "$(ns_name "$i")" link set lo up
        done
    fi
    cat > "$T/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$H($ctl_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$T/munge.sock,cred_expire=10
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool/%n
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.%n.pid
SlurmctldLogFile=$T/ctld.log
SlurmdLogFile=$T/d.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=1,sched_interval=2
SlurmdTimeout=10
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
$nodes_conf
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
    if [ "$n" -eq 1 ]; then
        slurmd -D -f "$T/slurm.conf" > "$T/d.out" 2>&1 &
        echo $! >> "$T/pids"
    else
        for i in $(seq "$n"); do node_launch "$T" "$i"; done
    fi
    for _ in $(seq 300); do
        if [ "$(sinfo -h -N -o %T 2>/dev/null | grep -c '^idle$')" = "$n" ]; then
            if [ "$n" -eq 1 ]; then
                echo "slurm cluster up: node $H idle ($cpus CPUs, ${mem} MiB, no GPUs), ports $SLURMCTLD_PORT/$SLURMD_PORT"
            else
                echo "slurm cluster up: nodes node[1-$n] idle at $subnet.11-$((10 + n)) ($cpus CPUs, ${mem} MiB each, no GPUs), ports $SLURMCTLD_PORT/$SLURMD_PORT"
            fi
            echo "export SLURM_CONF=$T/slurm.conf"
            return 0
        fi
        sleep 0.1
    done
    echo "the Slurm nodes did not become idle in 30 s; see $T/ctld.log and $T/d.*.log" >&2
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
    sinfo -N -o "%N %o %T %c %m"  # node, address, state, CPUs, memory (MiB)
    squeue
}

check_node_number() {  # T I VERB
    local n
    [ -f "$1/network" ] || die "$3 $2: the cluster at $1 has no separate nodes (start it with --nodes 2 or more)"
    n=$(read_network "$1")
    read_network "$1" >/dev/null  # sets SLURMCTLD_PORT here, not in the subshell above
    case "$2" in ''|*[!0-9]*) die "$3 $2: give a node number, 1 to $n" ;; esac
    if [ "$2" -lt 1 ] || [ "$2" -gt "$n" ]; then die "$3 $2: give a node number, 1 to $n"; fi
}

kill_node() {  # T I: as a crash would: slurmd and every process on the node die at once
    local T=$1 i=$2 pids
    check_node_number "$T" "$i" kill-node
    pids=$(ip netns pids "$(ns_name "$i")" 2>/dev/null || true)
    # shellcheck disable=SC2086  # a list of PIDs
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    rm -f "$T/node$i.pid"
    echo "node$i killed"
}

start_node() {
    local T=$1 i=$2
    check_node_number "$T" "$i" start-node
    [ -z "$(ip netns pids "$(ns_name "$i")" 2>/dev/null)" ] || die "start-node $i: node$i is running"
    export SLURM_CONF="$T/slurm.conf"
    node_launch "$T" "$i"
    echo "node$i started"
}

stop() {
    local T pid n i
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
    if [ -f "$T/pids" ]; then
        while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$T/pids"
    fi
    if [ -f "$T/network" ]; then
        n=$(read_network "$T")
        read_network "$T" >/dev/null
        for i in $(seq "$n"); do
            # shellcheck disable=SC2046  # a list of PIDs
            kill -9 $(ip netns pids "$(ns_name "$i")" 2>/dev/null) 2>/dev/null || true
        done
        sleep 0.2
        for i in $(seq "$n"); do ip netns del "$(ns_name "$i")" 2>/dev/null || true; done
        ip link del "$(bridge_name)" 2>/dev/null || true
        if [ -f "$T/netns_mount_ours" ] && [ -z "$(ls -A /run/netns 2>/dev/null)" ]; then
            umount /run/netns 2>/dev/null || true
        fi
        rm -f "$T/network" "$T/netns_mount_ours" "$T"/node*.pid
    fi
    [ -f "$T/pids" ] || { echo "stopped"; return 0; }
    sleep 1
    while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done < "$T/pids"
    rm -f "$T/pids"
    echo "stopped"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
NODES=1
NODE=""
DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
    --nodes) [ $# -ge 2 ] || die "--nodes needs a number" 2; NODES=$2; shift 2 ;;
    --nodes=*) NODES=${1#--nodes=}; shift ;;
    *) if [[ "$cmd" == *-node && -z "$NODE" ]]; then NODE=$1; else DIR=$1; fi; shift ;;
    esac
done
case "$NODES" in ''|*[!0-9]*|0) die "--nodes $NODES: give a number of nodes, 1 or more" 2 ;; esac
DIR=${DIR:-$DEFAULT_DIR}

case "$cmd" in
install) install ;;
start) install && start "$DIR" ;;
status) status "$DIR" ;;
env) mkdir -p "$DIR" && echo "export SLURM_CONF=$(realpath "$DIR")/slurm.conf" ;;
kill-node) kill_node "$(realpath "$DIR")" "$NODE" ;;
start-node) start_node "$(realpath "$DIR")" "$NODE" ;;
stop) stop "$DIR" ;;
*) echo "usage: local_cluster.sh install | start [DIR] [--nodes N] | status [DIR] | env [DIR] | kill-node I [DIR] | start-node I [DIR] | stop [DIR]" >&2; exit 2 ;;
esac
