#!/usr/bin/env bash
# Start a one-node Slurm test cluster on this machine, without systemd: munged, (MariaDB + slurmdbd),
# slurmctld and slurmd as plain daemons, one partition `debug` holding this node.
#
#   sudo bash scripts/slurm/start.sh        # installs what is missing, starts, smoke-tests (srun hostname)
#   sudo bash scripts/slurm/stop.sh         # stops what this script started
#
# Idempotent: a second run finds the running daemons, starts only what is missing and re-runs the
# smoke test. Job accounting (what `sacct` reads, and what snakemake-executor-plugin-slurm polls for job
# states) comes from slurmdbd backed by a private MariaDB instance; STFUSE_SLURM_ACCOUNTING=none skips
# both (then the Slurm profile must poll with squeue, see docs/slurm.md).
#
# Environment:
#   STFUSE_SLURM_DIR         state: spool, logs, pid files, database       [/tmp/stfuse-slurm]
#   STFUSE_SLURM_ACCOUNTING  slurmdbd | none                               [slurmdbd]
#   STFUSE_SLURM_DB_PORT     TCP port of the private MariaDB (127.0.0.1)    [23306]
#   STFUSE_SLURM_MEM_MARGIN  MB of the machine's memory kept out of Slurm   [max(1024, 10%)]
#   STFUSE_SLURM_CGROUP      auto | yes | no: proctrack/task cgroup (v1)    [auto: when usable]
#   STFUSE_SLURM_SMOKE_WAIT  seconds the smoke test may wait for a free CPU   [600]
#   STFUSE_SLURM_FORCE=1     overwrite an /etc/slurm/slurm.conf not written by this script
#
# Exit status: 0 cluster up and smoke test passed; 2 not root; 3 packages missing and not installable;
# 4 a foreign /etc/slurm/slurm.conf is present; 1 anything else (see the logs under $STFUSE_SLURM_DIR/log).
set -euo pipefail

STATE=${STFUSE_SLURM_DIR:-/tmp/stfuse-slurm}
ACCOUNTING=${STFUSE_SLURM_ACCOUNTING:-slurmdbd}
DB_PORT=${STFUSE_SLURM_DB_PORT:-23306}
CLUSTER=stfuse
PARTITION=debug
ETC=/etc/slurm
CONF=$ETC/slurm.conf
DBD_CONF=$ETC/slurmdbd.conf
CGROUP_CONF=$ETC/cgroup.conf
CGROUP=${STFUSE_SLURM_CGROUP:-auto}
SMOKE_WAIT=${STFUSE_SLURM_SMOKE_WAIT:-600}
MARK="# Written by stfuse scripts/slurm/start.sh (one-node test cluster); scripts/slurm/stop.sh --purge removes it."
HOST=$(hostname -s)

say() { printf '[slurm-start] %s\n' "$*"; }
die() { local code=$1; shift; printf '[slurm-start] ERROR: %s\n' "$*" >&2; exit "$code"; }

case "$ACCOUNTING" in slurmdbd|none) ;; *) die 1 "STFUSE_SLURM_ACCOUNTING must be slurmdbd or none, not '$ACCOUNTING'" ;; esac
case "$CGROUP" in auto|yes|no) ;; *) die 1 "STFUSE_SLURM_CGROUP must be auto, yes or no, not '$CGROUP'" ;; esac
[ "$(id -u)" = 0 ] || die 2 "must run as root (it installs packages and starts system daemons)"

# ---------------------------------------------------------------------------------------------- packages
need_pkgs=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
if [ "$ACCOUNTING" = slurmdbd ]; then
  command -v slurmdbd >/dev/null 2>&1 || need_pkgs+=(slurmdbd)
  command -v mariadbd >/dev/null 2>&1 || need_pkgs+=(mariadb-server)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die 3 "missing ${need_pkgs[*]} and no apt-get to install them"
  say "installing ${need_pkgs[*]} (apt-get, no recommends)"
  export DEBIAN_FRONTEND=noninteractive
  # Package scripts must not try to start services (no systemd here); we start the daemons ourselves.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; own_policy=1; fi
  ok=0
  if apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >"/tmp/stfuse-slurm-apt.log" 2>&1; then
    ok=1
  elif apt-get update -qq >>"/tmp/stfuse-slurm-apt.log" 2>&1 \
       && apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >>"/tmp/stfuse-slurm-apt.log" 2>&1; then
    ok=1
  fi
  [ "$own_policy" = 1 ] && rm -f "$policy"
  [ "$ok" = 1 ] || die 3 "apt-get could not install ${need_pkgs[*]} (see /tmp/stfuse-slurm-apt.log)"
fi

# ------------------------------------------------------------------------------------------- directories
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "${STFUSE_SLURM_FORCE:-0}" != 1 ]; then
  die 4 "$CONF exists and was not written by this script (a real cluster?); not touching it (STFUSE_SLURM_FORCE=1 overrides)"
fi
mkdir -p "$STATE"/{log,run,ctld,slurmd} "$ETC"
chmod 755 "$STATE"
STARTED=$STATE/started   # one daemon name a line: what stop.sh has to stop
touch "$STARTED"
mark_started() { grep -qx "$1" "$STARTED" || echo "$1" >> "$STARTED"; }

pid_alive() {  # pid_alive PIDFILE NAME: the pid file's process is alive and is NAME
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ]
}
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

# ------------------------------------------------------------------------------------------------ munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
  say "munged already running"
else
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 700 /etc/munge
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
  say "starting munged"
  runuser -u munge -- munged </dev/null >>"$STATE/log/munged.out" 2>&1 \
    || die 1 "munged did not start (see /var/log/munge/munged.log)"
  mark_started munged
  wait_for 20 munge munge_ok || die 1 "munge credentials do not work (see /var/log/munge/munged.log)"
fi

# ----------------------------------------------------------------------------------- MariaDB + slurmdbd
if [ "$ACCOUNTING" = slurmdbd ]; then
  DB=$STATE/mysql
  SOCK=$STATE/run/mysqld.sock
  PWFILE=$STATE/db.password
  db_ok() { mariadb-admin --no-defaults --socket="$SOCK" -uroot ping; }
  if db_ok >/dev/null 2>&1; then
    say "MariaDB already running (socket $SOCK)"
  else
    if [ ! -d "$DB/mysql" ]; then
      say "initialising MariaDB data directory $DB"
      install -d -o mysql -g mysql -m 750 "$DB"
      mariadb-install-db --no-defaults --user=mysql --datadir="$DB" --skip-test-db \
        >"$STATE/log/mariadb-install.log" 2>&1 || die 1 "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
    fi
    chown mysql:mysql "$STATE/run" 2>/dev/null || true
    chmod 755 "$STATE/run"
    say "starting MariaDB on 127.0.0.1:$DB_PORT"
    setsid -f mariadbd --no-defaults --user=mysql --datadir="$DB" --socket="$SOCK" \
      --pid-file="$STATE/run/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
      --log-error="$STATE/log/mariadbd.log" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
      --innodb-log-file-size=64M </dev/null >>"$STATE/log/mariadbd.out" 2>&1
    mark_started mariadbd
    wait_for 60 mariadb db_ok || die 1 "MariaDB did not come up (see $STATE/log/mariadbd.log)"
  fi
  [ -s "$PWFILE" ] || { (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$PWFILE"); }
  DB_PW=$(cat "$PWFILE")
  mariadb --no-defaults --socket="$SOCK" -uroot <<SQL || die 1 "could not create the slurm database user"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PW';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PW';
GRANT ALL ON stfuse_slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

  new_dbd=$(mktemp)
  cat > "$new_dbd" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PW
StorageLoc=stfuse_slurm_acct_db
EOF
  if ! cmp -s "$new_dbd" "$DBD_CONF"; then install -m 600 "$new_dbd" "$DBD_CONF"; fi
  rm -f "$new_dbd"
fi

# ------------------------------------------------------------------------------------------- slurm.conf
cpus=$(nproc)
total_mb=$(free -m | awk '/^Mem:/ {print $2}')
margin=${STFUSE_SLURM_MEM_MARGIN:-$(( total_mb / 10 > 1024 ? total_mb / 10 : 1024 ))}
real_mb=$(( total_mb - margin ))
[ "$real_mb" -ge 8000 ] || say "WARNING: only ${real_mb} MB for jobs; train_model/predict/score ask for 8000 MB (profiles/slurm)"
if [ "$ACCOUNTING" = slurmdbd ]; then
  acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  acct_lines="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# Process tracking: with cgroups (v1: memory, cpuset and freezer mounted and writable) each job is
# confined to its CPUs and memory, as on a real cluster; otherwise /proc-based tracking, no confinement.
cgroup_v1_usable() {
  local c probe
  for c in memory cpuset freezer; do
    awk -v m="/sys/fs/cgroup/$c" '$2 == m && $3 == "cgroup" {found = 1} END {exit !found}' /proc/mounts \
      || return 1
  done
  probe=/sys/fs/cgroup/memory/stfuse-probe.$$
  mkdir "$probe" 2>/dev/null && rmdir "$probe"
}
case "$CGROUP" in
  yes) track=cgroup ;;
  no) track=linuxproc ;;
  auto) if [ ! -e "$STATE/no-cgroup" ] && cgroup_v1_usable; then track=cgroup; else track=linuxproc; fi ;;
esac

write_conf() {  # write_conf cgroup|linuxproc: slurm.conf (and cgroup.conf); sets conf_changed
  local new track_lines
  if [ "$1" = cgroup ]; then
    track_lines="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup"
  else
    track_lines="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none"
  fi
  new=$(mktemp)
  cat > "$new" <<CONF
$MARK
# Accounting: $ACCOUNTING; process tracking: $1. State, logs and pid files under $STATE.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
$track_lines
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
SlurmdTimeout=120
InactiveLimit=0
KillWait=10
MinJobAge=300
$acct_lines
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
  conf_changed=0
  if ! cmp -s "$new" "$CONF"; then conf_changed=1; install -m 644 "$new" "$CONF"; fi
  if [ "$1" = cgroup ]; then
    printf '%s\nCgroupPlugin=cgroup/v1\nConstrainCores=yes\nConstrainRAMSpace=yes\n' "$MARK" > "$new"
    if ! cmp -s "$new" "$CGROUP_CONF"; then conf_changed=1; install -m 644 "$new" "$CGROUP_CONF"; fi
  elif [ -f "$CGROUP_CONF" ] && grep -qF "$MARK" "$CGROUP_CONF"; then
    rm -f "$CGROUP_CONF"
  fi
  rm -f "$new"
}
# Before slurmdbd starts: its clients (sacctmgr) read slurm.conf too.
write_conf "$track"

# ----------------------------------------------------------------------------------------- slurm daemons
if [ "$ACCOUNTING" = slurmdbd ]; then
  dbd_ok() { sacctmgr -n -P list cluster format=cluster; }
  if pid_alive "$STATE/run/slurmdbd.pid" slurmdbd; then
    say "slurmdbd already running"
  else
    say "starting slurmdbd"
    slurmdbd </dev/null >>"$STATE/log/slurmdbd.out" 2>&1 || die 1 "slurmdbd did not start (see $STATE/log/slurmdbd.log)"
    mark_started slurmdbd
    wait_for 60 slurmdbd dbd_ok || die 1 "slurmdbd does not answer (see $STATE/log/slurmdbd.log)"
  fi
  # The cluster must be known to slurmdbd before slurmctld registers; root gets the default association.
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die 1 "sacctmgr could not add cluster $CLUSTER"
  fi
fi

ctld_ok() { scontrol ping | grep -q 'is UP'; }
stop_daemon() {  # stop_daemon NAME: TERM through its pid file, wait up to 30 s
  local pid i
  pid=$(cat "$STATE/run/$1.pid" 2>/dev/null || true)
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL "$pid" 2>/dev/null || true
}
node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1; }
node_ready() { case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac; }

start_slurm() {  # (re)start slurmctld and slurmd as the current slurm.conf needs, wait for the node
  local d state
  if [ "$conf_changed" = 1 ]; then
    # A new slurm.conf (other accounting mode, memory, tracking): restart the Slurm daemons to apply it.
    for d in slurmd slurmctld; do
      if pid_alive "$STATE/run/$d.pid" "$d"; then say "slurm.conf changed: restarting $d"; stop_daemon "$d"; fi
    done
  fi
  if pid_alive "$STATE/run/slurmctld.pid" slurmctld; then
    say "slurmctld already running"
  else
    say "starting slurmctld"
    slurmctld </dev/null >>"$STATE/log/slurmctld.out" 2>&1 || die 1 "slurmctld did not start (see $STATE/log/slurmctld.log)"
    mark_started slurmctld
    wait_for 60 slurmctld ctld_ok || die 1 "slurmctld does not answer (see $STATE/log/slurmctld.log)"
  fi
  if pid_alive "$STATE/run/slurmd.pid" slurmd; then
    say "slurmd already running"
  else
    say "starting slurmd"
    slurmd </dev/null >>"$STATE/log/slurmd.out" 2>&1 || die 1 "slurmd did not start (see $STATE/log/slurmd.log)"
    mark_started slurmd
  fi
  if ! wait_for 60 node node_ready; then
    state=$(node_state)
    case "$state" in
      *drain*|down*) say "node $HOST is '$state': resuming it"; scontrol update nodename="$HOST" state=resume || true ;;
    esac
    wait_for 30 node node_ready || die 1 "node $HOST is '$(node_state)', not idle (see $STATE/log/slurmd.log, scontrol show node)"
  fi
  say "node $HOST is $(node_state) in partition $PARTITION ($cpus CPUs, $real_mb MB, tracking: $track)"
}

smoke() {  # srun hostname on the node; sets smoke_id, smoke_out, smoke_rc (124: never got a CPU)
  local out queued
  queued=$(squeue -h -t PENDING,RUNNING 2>/dev/null | wc -l)
  [ "$queued" = 0 ] || say "$queued job(s) queued or running: the smoke test waits for a free CPU (at most ${SMOKE_WAIT} s)"
  smoke_rc=0
  out=$(timeout "$SMOKE_WAIT" srun -p "$PARTITION" -N1 -n1 -t 1 --mem=100 -J stfuse-smoke \
          sh -c 'echo "$SLURM_JOB_ID $(hostname)"' 2>&1) || smoke_rc=$?
  if [ "$smoke_rc" != 0 ]; then smoke_out=$out; return 1; fi
  smoke_id=${out%% *}
  smoke_out=${out#* }
  [ "$smoke_out" = "$(hostname)" ] || { smoke_rc=1; return 1; }
}

start_slurm
if ! smoke; then
  if [ "$smoke_rc" = 124 ]; then
    # Pending all along (the node busy with other jobs) says nothing about the set-up: no fallback.
    die 1 "smoke test 'srun hostname' did not get a CPU within ${SMOKE_WAIT} s (node busy? see squeue)"
  elif [ "$CGROUP" = auto ] && [ "$track" = cgroup ]; then
    say "smoke test failed with cgroups ($smoke_out): falling back to proctrack/linuxproc"
    touch "$STATE/no-cgroup"   # remembered: later runs go straight to linuxproc (rm it to retry)
    track=linuxproc
    write_conf "$track"
    start_slurm
    smoke || die 1 "smoke test 'srun hostname' failed: $smoke_out (see $STATE/log/slurmd.log)"
  else
    die 1 "smoke test 'srun hostname' failed: $smoke_out (see $STATE/log/slurmd.log)"
  fi
fi
if [ "$ACCOUNTING" = slurmdbd ]; then
  # The executor plugin polls `sacct`; check that the smoke test's job reached the accounting database.
  wait_for 30 sacct bash -c "sacct -X -n -P -o State -j '$smoke_id' | grep -qx COMPLETED" \
    || die 1 "sacct does not report job $smoke_id as COMPLETED (see $STATE/log/slurmdbd.log)"
fi
say "ready: srun hostname -> $smoke_out (job $smoke_id); accounting: $ACCOUNTING; tracking: $track; state in $STATE"
