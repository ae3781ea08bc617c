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
# shellcheck source=slurm/daemons.sh
source "$HERE/daemons.sh"
lock_for_stop stop-cluster.sh

started_pid slurmctld >/dev/null && cancel_jobs
stop_started
