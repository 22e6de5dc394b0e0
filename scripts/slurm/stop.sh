#!/usr/bin/env bash
# Stop the one-node Slurm test cluster that scripts/slurm/start.sh started: cancels its jobs, then
# stops slurmd, slurmctld, slurmdbd, MariaDB and munged -- only the daemons start.sh recorded as
# started by itself ($STFUSE_SLURM_DIR/started), each through its pid file.
#
#   sudo bash scripts/slurm/stop.sh           # stop; state (job ids, accounting database) is kept
#   sudo bash scripts/slurm/stop.sh --purge   # also delete $STFUSE_SLURM_DIR and the slurm.conf /
#                                             # slurmdbd.conf that start.sh wrote (packages stay)
# Waits (STFUSE_SLURM_STOP_WAIT seconds, 1800) while a run_demo.sh is using the cluster.
set -euo pipefail

STATE=${STFUSE_SLURM_DIR:-/tmp/stfuse-slurm}
MARK="# Written by stfuse scripts/slurm/start.sh (one-node test cluster); scripts/slurm/stop.sh --purge removes it."
PURGE=0
for arg in "$@"; do
  case "$arg" in
    --purge) PURGE=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
  esac
done

say() { printf '[slurm-stop] %s\n' "$*"; }
[ "$(id -u)" = 0 ] || { say "must run as root"; exit 2; }

# run_demo.sh holds a shared lock on $STATE/use.lock while it uses the cluster: wait for it to finish.
WAIT=${STFUSE_SLURM_STOP_WAIT:-1800}
if [ -d "$STATE" ]; then
  exec 9>>"$STATE/use.lock"
  if ! flock -x -n 9; then
    say "the cluster is in use (run_demo.sh): waiting up to $WAIT s"
    flock -x -w "$WAIT" 9 || { say "still in use after $WAIT s; not stopping"; exit 1; }
  fi
fi

STARTED=$STATE/started
started() { [ -f "$STARTED" ] && grep -qx "$1" "$STARTED"; }

stop_pid() {  # stop_pid NAME PIDFILE: TERM, wait up to 30 s, then KILL
  local name=$1 pidfile=$2 pid i
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null || [ "$(cat /proc/"$pid"/comm 2>/dev/null)" != "$name" ]; then
    say "$name is not running"
    return 0
  fi
  say "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 60); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  say "$name did not stop in 30 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

if [ ! -s "$STARTED" ]; then
  say "nothing recorded in $STARTED: no daemon of the test cluster to stop"
else
  if started slurmctld && command -v squeue >/dev/null 2>&1; then
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      say "cancelling jobs: $(echo $jobs)"
      # shellcheck disable=SC2086
      timeout 20 scancel $jobs 2>/dev/null || true
      for i in $(seq 20); do [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null || true)" ] && break; sleep 0.5; done
    fi
  fi
  started slurmd && stop_pid slurmd "$STATE/run/slurmd.pid"
  started slurmctld && stop_pid slurmctld "$STATE/run/slurmctld.pid"
  started slurmdbd && stop_pid slurmdbd "$STATE/run/slurmdbd.pid"
  started mariadbd && stop_pid mariadbd "$STATE/run/mariadbd.pid"
  started munged && stop_pid munged /run/munge/munged.pid
  rm -f "$STARTED"
fi

if [ "$PURGE" = 1 ]; then
  for f in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf /etc/slurm/cgroup.conf; do
    if [ -f "$f" ] && grep -qF "$MARK" "$f"; then say "removing $f"; rm -f "$f"; fi
  done
  if [ -d "$STATE" ]; then say "removing $STATE"; rm -rf "$STATE"; fi
fi
say "done"
