# Helpers shared by the start and stop scripts of both clusters (sourced, not run).
# Expects STATE and die(); start_mariadb also launch(), db(), DB_SOCKET, DB_PORT, DB_PASS. Every daemon a cluster starts is recorded as
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

start_mariadb() {  # start_mariadb [COMMAND PREFIX...] -- [MARIADBD OPTION...]: the accounting database
  local prefix=()
  while [ "$1" != "--" ]; do prefix+=("$1"); shift; done
  shift
  install -d -o mysql -g mysql -m 755 "$STATE/mysql-run"
  if ! alive mariadbd "$STATE/mysql-run/mariadb.pid"; then
    if [ ! -d "$STATE/mysql/mysql" ]; then
      install -d -o mysql -g mysql -m 700 "$STATE/mysql"
      mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" --skip-test-db \
        >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $STATE/log/mariadb-install.log"
    fi
    launch "${prefix[@]}" setsid -f mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" \
      --socket="$DB_SOCKET" --pid-file="$STATE/mysql-run/mariadb.pid" --bind-address=127.0.0.1 \
      --port="$DB_PORT" --log-error="$STATE/log/mariadb.log" "$@"
    wait_for mariadbd 30 "$STATE/log/mariadb.log" db -e "select 1"
    record mariadbd "$STATE/mysql-run/mariadb.pid"
  fi
  db <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
}

cancel_jobs() {  # cancel_jobs [COMMAND PREFIX...]: cancel every job and wait up to 15 s for them to end
  local jobs _
  # Job steps outlive slurmd; cancel them while the controller can still reach them.
  jobs=$("$@" squeue -h -o %A 2>/dev/null || true)
  [ -n "$jobs" ] && { "$@" scancel $jobs >/dev/null 2>&1 || true; }
  for _ in $(seq 75); do
    [ -z "$("$@" squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
    sleep 0.2
  done
}

lock_for_stop() {  # lock_for_stop SCRIPT: as root, with daemons recorded, hold the state lock (fd 9); else exit
  [ "$(id -u)" = 0 ] || die "must run as root (the daemons, munge and the namespaces are root's)"
  [ -d "$STATE/started" ] || { echo "$1: nothing to stop ($STATE/started missing)"; exit 0; }
  exec 9>"$STATE/lock"
  flock 9
}
