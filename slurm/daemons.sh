# Helpers shared by the start and stop scripts of both clusters (sourced, not run).
# Expects STATE and die(). Every daemon a cluster starts is recorded as
# $STATE/started/NAME holding "PID [COMM]" (COMM defaults to NAME: the name a
# node's slurmd-node1 runs under is slurmd), and only those are ever stopped.

pid_is() {  # pid_is NAME PID: PID is a live process whose command is NAME
  [ -n "$2" ] && kill -0 "$2" 2>/dev/null && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ]
}

alive() {  # alive NAME PIDFILE
  [ -s "$2" ] && pid_is "$1" "$(cat "$2")"
}

record() {  # record NAME PIDFILE [COMM]: remember the PID a daemon wrote after it forked
  local name=$1 pidfile=$2 comm=${3:-$1} i
  for i in $(seq 50); do
    alive "$comm" "$pidfile" && { echo "$(cat "$pidfile") $comm" >"$STATE/started/$name"; return 0; }
    sleep 0.2
  done
  die "$name did not start (no live PID in $pidfile); see $STATE/log/"
}

started_pid() {  # started_pid NAME: the recorded PID of daemon NAME if it still runs (else fails)
  local pid comm
  [ -s "$STATE/started/$1" ] || return 1
  read -r pid comm <"$STATE/started/$1"
  pid_is "${comm:-$1}" "$pid" && echo "$pid"
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
  local f
  for f in "$STATE"/started/*; do
    [ -e "$f" ] && started_pid "$(basename "$f")" >/dev/null && return 0
  done
  return 1
}

stop_started() {  # TERM the recorded daemons group by group, KILL what is left after 15 s
  local group name pid comm i entry pids
  # slurmctld flushes accounting to slurmdbd, which flushes it to mariadbd.
  for group in "slurmd slurmd-* slurmctld" "slurmdbd" "mariadbd munged"; do
    pids=()
    for name in $(cd "$STATE/started" && ls -d $group 2>/dev/null); do
      read -r pid comm <"$STATE/started/$name"
      comm=${comm:-$name}
      pid_is "$comm" "$pid" && kill -TERM "$pid" && pids+=("$name:$comm:$pid")
      rm -f "$STATE/started/$name"
    done
    for entry in "${pids[@]}"; do
      IFS=: read -r name comm pid <<<"$entry"
      for i in $(seq 75); do pid_is "$comm" "$pid" || break; sleep 0.2; done
      pid_is "$comm" "$pid" && kill -KILL "$pid"
      echo "stopped $name (pid $pid)"
    done
  done
}
