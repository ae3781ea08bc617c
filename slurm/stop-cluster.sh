#!/usr/bin/env bash
# Stop the single-node SLURM that slurm/start-cluster.sh started: cancel its
# jobs, then stop by PID only the daemons that script started (a munged that
# was already running stays). Packages, configuration and the accounting
# database stay, so the next start is quick.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
case ${1:-nodes=1} in  # nodes=N (N > 1): the multi-node cluster of slurm/start-nodes.sh
  nodes=1) ;;
  nodes=*) exec bash "$HERE/stop-nodes.sh" ;;
  *) echo "stop-cluster.sh: unknown argument $1 (expected nodes=N)" >&2; exit 2 ;;
esac
STATE=${DTR_SLURM_STATE:-/var/lib/dtr-scale-slurm}
die() { echo "stop-cluster.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (the daemons run as root and munge)"
[ -d "$STATE/started" ] || { echo "stop-cluster.sh: nothing to stop ($STATE/started missing)"; exit 0; }
exec 9>"$STATE/lock"
flock 9

# shellcheck source=slurm/daemons.sh
source "$HERE/daemons.sh"

if started_pid slurmctld >/dev/null; then
  # Job steps outlive slurmd; cancel them while the controller can still reach them.
  jobs=$(squeue -h -o %A 2>/dev/null || true)
  [ -n "$jobs" ] && { scancel $jobs >/dev/null 2>&1 || true; }
  for _ in $(seq 75); do
    [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
    sleep 0.2
  done
fi
stop_started
