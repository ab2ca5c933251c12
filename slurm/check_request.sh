#!/bin/bash
# Sourced by the `submit` mode of every slurm/ script: a job that asks for more than any node
# of its partition has waits in the queue forever (Reason=PartitionConfig) with no log, so check
# the request against `sinfo` first and stop with one line naming the variable to change.
#
#   check_request NODES TASKS_PER_NODE CPUS_PER_TASK MEM GPUS_PER_NODE [sbatch args...]
#
# MEM as sbatch takes it (64G, 16000M, 16000; 0 = a whole node). The partition is the one named
# by --partition/-p in the sbatch args, else the cluster's default. Returns 1 (after printing
# `error: ...`) when the request cannot fit; 0 when it fits or when sinfo cannot tell.

_mem_mb() {  # sbatch memory syntax -> MB
    local v=${1^^}
    case "$v" in
        *T) echo $(( ${v%T} * 1024 * 1024 )) ;;
        *G) echo $(( ${v%G} * 1024 )) ;;
        *M) echo "${v%M}" ;;
        *K) echo $(( ${v%K} / 1024 )) ;;
        *) echo "$v" ;;
    esac
}

check_request() {
    local nodes=$1 tasks=$2 cpus=$3 mem=$4 gpus=$5
    shift 5
    local part="" prev="" a
    for a in "$@"; do
        case "$a" in
            --partition=*) part=${a#--partition=} ;;
            -p?*) part=${a#-p} ;;
        esac
        if [ "$prev" = "-p" ] || [ "$prev" = "--partition" ]; then part=$a; fi
        prev=$a
    done
    command -v sinfo >/dev/null || return 0
    local info
    if [ -n "$part" ]; then
        info=$(sinfo -h -N -p "$part" -o "%P %c %m %G" 2>/dev/null) || return 0
        if [ -z "$info" ]; then
            echo "error: EXTRA_SBATCH_ARGS: partition $part has no nodes (sinfo -p $part); name another partition" >&2
            return 1
        fi
    else
        info=$(sinfo -h -N -o "%P %c %m %G" 2>/dev/null | awk '$1 ~ /\*$/') || return 0
        [ -n "$info" ] || return 0
        part=$(echo "$info" | awk 'NR == 1 {sub(/\*$/, "", $1); print $1}')
    fi
    local n max_cpus max_mem max_gpus
    n=$(echo "$info" | wc -l)
    max_cpus=$(echo "$info" | awk '$2 > m {m = $2} END {print m + 0}')
    max_mem=$(echo "$info" | awk '$3 + 0 > m {m = $3 + 0} END {print m + 0}')
    max_gpus=$(echo "$info" | awk '{g = 0; if (match($4, /gpu(:[^:,(]+)?:[0-9]+/)) {s = substr($4, RSTART, RLENGTH);
                                   sub(/.*:/, "", s); g = s + 0} if (g > m) m = g} END {print m + 0}')
    if [ "$nodes" -gt "$n" ]; then
        echo "error: NODES=$nodes: partition $part has $n node(s); set NODES=$n or fewer" >&2
        return 1
    fi
    if [ "$gpus" -gt "$max_gpus" ]; then
        echo "error: GPUS_PER_NODE=$gpus: the nodes of partition $part have at most $max_gpus GPU(s); set" \
             "GPUS_PER_NODE=$max_gpus (0 runs on CPUs with gloo) or name a GPU partition in EXTRA_SBATCH_ARGS" >&2
        return 1
    fi
    if [ "$tasks" -gt "$max_cpus" ]; then
        echo "error: $tasks task(s) per node (GPUS_PER_NODE, or CPU_TASKS_PER_NODE when GPUS_PER_NODE=0) but the" \
             "largest node of partition $part has $max_cpus CPUs; set at most $max_cpus tasks per node" >&2
        return 1
    fi
    if [ $(( tasks * cpus )) -gt "$max_cpus" ]; then
        echo "error: CPUS_PER_TASK=$cpus x $tasks task(s) per node needs $(( tasks * cpus )) CPUs, the largest node" \
             "of partition $part has $max_cpus; set CPUS_PER_TASK=$(( max_cpus / tasks )) or fewer" >&2
        return 1
    fi
    local want
    want=$(_mem_mb "$mem")
    if [ "$want" -gt "$max_mem" ]; then
        echo "error: MEM=$mem: the largest node of partition $part has ${max_mem}M; set MEM=${max_mem}M or less" \
             "(MEM=0 takes a whole node)" >&2
        return 1
    fi
    return 0
}
