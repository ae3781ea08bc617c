#!/usr/bin/env bash
# Stop the multi-node SLURM that slurm/start-nodes.sh started (`slurm/stop-cluster.sh nodes=N`
# runs this): cancel its jobs, stop by PID only the daemons it started, remove its network
# namespaces and then the safety route. State (accounting database, munge key) stays, so
# the next start is quick; DTR_SLURM_PURGE=1 also deletes the state directory.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${DTR_SLURM_NODES_STATE:-/var/lib/dtr-scale-slurm-nodes}
NSP=${DTR_SLURM_NS:-dtrn}
NET=${DTR_SLURM_NET:-10.77.0}
die() { echo "stop-nodes.sh: $*" >&2; exit 1; }
# shellcheck source=slurm/daemons.sh
source "$HERE/daemons.sh"
lock_for_stop stop-nodes.sh

started_pid slurmctld >/dev/null &&
  cancel_jobs env SLURM_CONF="$STATE/etc/slurm/slurm.conf" nsenter --net="/run/netns/$NSP-head" --
stop_started
for ns in $(ip netns list | awk '{print $1}' | grep -E "^$NSP-(node[0-9]+|head)\$" | sort -r); do
  left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  [ -n "$left" ] && echo "stop-nodes.sh: warning: processes still in $ns: $left (left alone)"
  ip netns del "$ns" && echo "removed network namespace $ns"
done
# The route goes last: with the namespaces gone, the client commands cannot run anywhere.
ip route del unreachable "$NET.0/24" 2>/dev/null || true
if [ "${DTR_SLURM_PURGE:-0}" = 1 ]; then
  exec 9>&-
  rm -rf "$STATE" && echo "removed $STATE"
fi
