#!/bin/bash
# The network interface gloo and NCCL use between nodes, chosen and checked before any rank
# waits on another. Sourced by the slurm/ job scripts (`network_setup`, after MASTER_ADDR is set);
# run on every node of a job as `bash slurm/network.sh check IFACE MASTER_ADDR` (the scripts do).
#
# Why: without GLOO_SOCKET_IFNAME, gloo advertises the address the node's own hostname resolves
# to. Where /etc/hosts maps the hostname to loopback (Debian's "127.0.1.1 node1" line), the other
# nodes are told to connect to 127.0.1.1 and fail after minutes with "Gloo connectFullMesh failed
# ... remote=[127.0.1.1]". NCCL's bootstrap picks an interface by itself and can pick a wrong one.
#
# NETWORK_INTERFACE (e.g. ib0, eth0, or a comma-separated list) overrides the choice. Otherwise
# it is the interface of this node's route to the master (or, on the master itself, to the next
# node of the job). GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME already set in the environment win.
# A one-node job needs none of this and is left alone (unless NETWORK_INTERFACE is set).

resolve_ipv4() { getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}'; }
is_loopback() { case "$1" in 127.*) return 0 ;; *) return 1 ;; esac; }
own_address() { ip -o -4 addr show 2>/dev/null | awk -v ip="$1" '{split($4, a, "/"); if (a[1] == ip) {print $2; exit}}'; }

route_interface() {  # the interface this node uses to reach IPv4 address $1
    local dev
    dev=$(ip -o route get "$1" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
    [ "$dev" = lo ] && dev=$(own_address "$1")  # $1 is one of this node's own addresses
    echo "$dev"
}

choose_interface() {  # MASTER NODE...: prints the interface, or one line on stderr and fails
    local master=$1 peer ip
    shift
    [ -n "${NETWORK_INTERFACE:-}" ] && { echo "$NETWORK_INTERFACE"; return 0; }
    for peer in "$master" "$@"; do
        ip=$(resolve_ipv4 "$peer")
        [ -n "$ip" ] || continue
        # the master seen from itself (or through a loopback /etc/hosts line): try the next node
        if is_loopback "$ip" || [ -n "$(own_address "$ip")" ]; then continue; fi
        route_interface "$ip"
        return 0
    done
    echo "error: NETWORK_INTERFACE: no route from $(hostname -s) to another node of the job ($master $*) could be found (their names resolve to loopback or not at all); set NETWORK_INTERFACE to the interface the nodes share (e.g. eth0 or ib0), or map each node's name to its address in /etc/hosts" >&2
    return 1
}

network_setup() {  # in a job script: choose, check on every node, export; exits on a problem
    local iface
    if [ "${SLURM_JOB_NUM_NODES:-1}" -le 1 ]; then
        [ -n "${NETWORK_INTERFACE:-}" ] || return 0
        iface=$NETWORK_INTERFACE
    else
        # shellcheck disable=SC2046  # the job's host names
        iface=$(choose_interface "$MASTER_ADDR" $(scontrol show hostnames "$SLURM_JOB_NODELIST")) || exit 1
        # every node checks the choice and its own name before training starts; one line each
        if ! srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=0 \
                bash "${BASH_SOURCE[0]}" check "$iface" "$MASTER_ADDR"; then
            echo "$(date -Is) network check failed (above); nothing was started" >&2
            exit 1
        fi
    fi
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$iface} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$iface}
    echo "network: gloo on $GLOO_SOCKET_IFNAME, NCCL on $NCCL_SOCKET_IFNAME"
}

check_node() {  # IFACE MASTER: on one node; one line, exit 1 on a problem
    local iface=$1 master=$2 node addr self master_ip
    node=$(hostname -s)
    addr=""
    local i
    for i in ${iface//,/ }; do
        addr=$(ip -o -4 addr show dev "$i" 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}')
        [ -n "$addr" ] && { iface=$i; break; }
    done
    if [ -z "$addr" ]; then
        echo "error: $node: network interface $iface has no IPv4 address on this node (its interfaces: $(ip -o -4 addr show 2>/dev/null | awk '$2 != "lo" {printf "%s%s", sep, $2; sep=", "}')); set NETWORK_INTERFACE to one every node has" >&2
        return 1
    fi
    if is_loopback "$addr"; then
        echo "error: $node: network interface $iface is loopback; set NETWORK_INTERFACE to the interface the nodes share (e.g. eth0 or ib0)" >&2
        return 1
    fi
    master_ip=$(resolve_ipv4 "$master")
    if [ -z "$master_ip" ]; then
        echo "error: $node: the master's name $master does not resolve on this node; add it to DNS or /etc/hosts" >&2
        return 1
    fi
    if is_loopback "$master_ip" && [ "$master" != "$node" ]; then
        echo "error: $node: the master's name $master resolves to $master_ip (loopback) on this node; map $master to its network address in /etc/hosts" >&2
        return 1
    fi
    self=$(resolve_ipv4 "$node")
    if [ -z "$self" ] || is_loopback "$self"; then
        echo "network: $node: hostname $node resolves to ${self:-nothing} here, not to a network address: gloo and NCCL are told to use $iface ($addr) instead; to fix it at the source, map $node to $addr in /etc/hosts"
    else
        echo "network: $node: $iface $addr"
    fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case "${1:-}" in
    check) [ $# -eq 3 ] || { echo "usage: network.sh check IFACE MASTER_ADDR" >&2; exit 2; }; check_node "$2" "$3" ;;
    *) echo "usage: network.sh check IFACE MASTER_ADDR (or source it and call network_setup)" >&2; exit 2 ;;
    esac
fi
