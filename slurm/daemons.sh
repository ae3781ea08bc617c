# Helpers shared by start-cluster.sh and stop-cluster.sh (sourced, not run).
# Expects STATE and die(). Every daemon this cluster starts is recorded as
# $STATE/started/NAME holding its PID, and only those are ever stopped.

DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)

pid_is() {  # pid_is NAME PID: PID is a live process whose command is NAME
  [ -n "$2" ] && kill -0 "$2" 2>/dev/null && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]
}

alive() {  # alive NAME PIDFILE
  [ -s "$2" ] && pid_is "$1" "$(cat "$2")"
}

record() {  # record NAME PIDFILE: remember the PID a daemon wrote after it forked
  local i
  for i in $(seq 50); do
    alive "$1" "$2" && { cp "$2" "$STATE/started/$1"; return 0; }
    sleep 0.2
  done
  die "$1 did not start (no live PID in $2); see $STATE/log/"
}

wait_for() {  # wait_for LABEL SECONDS LOGFILE COMMAND...
  local label=$1 seconds=$2 log=$3 i
  shift 3
  for i in $(seq $((seconds * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "--- last lines of $log:" >&2
  tail -n 20 "$log" >&2 2>/dev/null || true
  die "$label not ready after ${seconds}s (checked: $*)"
}

any_started() {
  local name
  for name in "${DAEMONS[@]}"; do
    [ -s "$STATE/started/$name" ] && pid_is "$name" "$(cat "$STATE/started/$name")" && return 0
  done
  return 1
}

stop_started() {  # TERM the recorded daemons group by group, KILL what is left after 15 s
  local group name pid i pids
  # slurmctld flushes accounting to slurmdbd, which flushes it to mariadbd.
  for group in "slurmd slurmctld" "slurmdbd" "mariadbd munged"; do
    pids=()
    for name in $group; do
      [ -s "$STATE/started/$name" ] || continue
      pid=$(cat "$STATE/started/$name")
      pid_is "$name" "$pid" && kill -TERM "$pid" && pids+=("$name:$pid")
      rm -f "$STATE/started/$name"
    done
    for entry in "${pids[@]}"; do
      name=${entry%%:*} pid=${entry#*:}
      for i in $(seq 75); do pid_is "$name" "$pid" || break; sleep 0.2; done
      pid_is "$name" "$pid" && kill -KILL "$pid"
      echo "stopped $name (pid $pid)"
    done
  done
}
