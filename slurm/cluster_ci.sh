#!/usr/bin/env bash
# A real Slurm cluster on one host for CI and local testing of slurm/*.sbatch: slurmctld plus
# N slurmd daemons (nodes n1..nN, all reachable at 127.0.0.1), Debian 12 slurm-wlm 22.05, root,
# no systemd (cgroup-free: proctrack/linuxproc). Jobs see NodeAddr=127.0.0.1, so every
# component of a "multi-node" job talks over loopback only.
#   slurm/cluster_ci.sh up        install if needed, (re)start munged [+mariadb+slurmdbd] + slurmctld + N slurmd
#   slurm/cluster_ci.sh down      stop every daemon this script started (by pid file), idempotent
#   slurm/cluster_ci.sh status    exit 0 when the cluster answers and all nodes are up
#   slurm/cluster_ci.sh run CMD   up; CMD (with SLURM_CONF exported); down  -> exit code of CMD
#   slurm/cluster_ci.sh env       print 'export SLURM_CONF=...' for the caller
# Knobs: SLURM_CI_DIR (${TMPDIR:-/tmp}/steer-slurm-ci)  SLURM_CI_NODES (2)  SLURM_CI_CPUS (2 per node)
#        SLURM_CI_GPUS (0: fake gres/gpu count per node)  SLURM_CI_ACCOUNTING (1: slurmdbd+mariadb, needed by sacct)
set -euo pipefail
D=${SLURM_CI_DIR:-${TMPDIR:-/tmp}/steer-slurm-ci}
NODES=${SLURM_CI_NODES:-2}; CPUS=${SLURM_CI_CPUS:-2}; GPUS=${SLURM_CI_GPUS:-0}; ACCT=${SLURM_CI_ACCOUNTING:-1}
export SLURM_CONF=$D/etc/slurm.conf
MSOCK=$D/run/munge.socket.2 DBSOCK=$D/run/mysqld.sock
t0=$(date +%s.%N); lap() { awk -v m="$1" -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{printf "[slurm_ci] %-30s %6.2fs\n", m, a-b}'; }
wait_for() { local what=$1 n=$2; shift 2; for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
             echo "[slurm_ci] timeout waiting for $what" >&2; tail -n 20 "$D"/log/*.log >&2 || true; return 1; }

stop_pidfile() {  # stop one daemon started by us, by the pid in its pid file
  local f=$1 pid; [ -s "$f" ] || return 0; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then kill "$pid"; for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"; fi; rm -f "$f"; }

down() {
  [ -d "$D/run" ] || return 0
  if [ -s "$D/run/slurmctld.pid" ]; then scancel --state=PENDING,RUNNING --full -u root >/dev/null 2>&1 || true; fi
  local f; for f in "$D"/run/slurmd-*.pid "$D/run/slurmctld.pid"; do stop_pidfile "$f" & done; wait
  stop_pidfile "$D/run/slurmdbd.pid" & stop_pidfile "$D/run/mysqld.pid" & wait
  stop_pidfile "$D/run/munged.pid"
  lap "down"
}

install() {
  [ "$(id -u)" = 0 ] || { echo "[slurm_ci] must run as root (it installs packages and runs slurmd as root)" >&2; exit 1; }
  local pkgs="slurmctld slurmd slurm-client munge"
  [ "$ACCT" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  local missing=""; for p in $pkgs; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  lap "apt install (${missing:- none})"
}

write_conf() {
  mkdir -p "$D"/{etc,state,log,run,munge,spool}; chmod 755 "$D" "$D/run"; chmod 700 "$D/munge"
  local n; for n in $(seq 1 "$NODES"); do mkdir -p "$D/spool/n$n"; done
  local gres="" acct="AccountingStorageType=accounting_storage/none"
  if [ "$GPUS" -gt 0 ]; then   # fake GPUs: gres/gpu needs File=; char nodes (major 195) make Slurm set CUDA_VISIBLE_DEVICES
    gres="Gres=gpu:$GPUS"; mkdir -p "$D/dev"; for g in $(seq 0 $((GPUS - 1))); do [ -c "$D/dev/nvidia$g" ] || { rm -f "$D/dev/nvidia$g"; mknod "$D/dev/nvidia$g" c 195 "$g"; }; done
    printf 'AutoDetect=off\nNodeName=n[1-%s] Name=gpu File=%s/dev/nvidia[0-%s]\n' "$NODES" "$D" $((GPUS - 1)) > "$D/etc/gres.conf"
  else rm -f "$D/etc/gres.conf"; fi
  [ "$ACCT" = 1 ] && acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoragePass=$MSOCK"
  cat > "$SLURM_CONF" <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=6817
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MSOCK
$acct
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
# Batch jobs are requeueable by default (the preemption path: scontrol requeue)
JobRequeue=1
GresTypes=gpu
NodeName=n[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[6821-$((6820 + NODES))] CPUs=$CPUS RealMemory=4000 $gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$D/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MSOCK
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmci
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$D/etc/slurmdbd.conf"
  [ -s "$D/munge/munge.key" ] || { mungekey --create --keyfile="$D/munge/munge.key"; chmod 400 "$D/munge/munge.key"; }
  lap "config written"
}

up() {
  down >/dev/null                       # idempotent: stop whatever an earlier 'up' left behind
  install; rm -rf "$D/state" "$D/spool"; write_conf
  munged --socket="$MSOCK" --key-file="$D/munge/munge.key" --pid-file="$D/run/munged.pid" \
         --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"
  wait_for munge 50 bash -c "munge -n -S $MSOCK | unmunge -S $MSOCK"; lap "munged up"
  if [ "$ACCT" = 1 ]; then
    rm -rf "$D/mysql"                           # fresh accounting DB each time: job ids restart, no stale sacct rows
    mariadb-install-db --no-defaults --datadir="$D/mysql" --user=root --skip-test-db >"$D/log/mariadb-install.log" 2>&1
    (mariadbd --no-defaults --datadir="$D/mysql" --socket="$DBSOCK" --pid-file="$D/run/mysqld.pid" --skip-networking \
              --user=root --innodb-buffer-pool-size=64M --log-error="$D/log/mariadb.log" </dev/null >/dev/null 2>&1 &)
    wait_for mariadb 100 mariadb --no-defaults -S "$DBSOCK" -uroot -e 'select 1'
    mariadb --no-defaults -S "$DBSOCK" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmci';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    lap "mariadb up"
    MYSQL_UNIX_PORT=$DBSOCK slurmdbd            # reads slurmdbd.conf next to \$SLURM_CONF
    wait_for slurmdbd 100 bash -c "ss -ltn | grep -q ':6819 '"; lap "slurmdbd up"
  fi
  slurmctld -c                                  # -c: clean start, no jobs/state from an earlier run
  wait_for slurmctld 100 bash -c "scontrol ping | grep -q UP"; lap "slurmctld up"
  local n; for n in $(seq 1 "$NODES"); do slurmd -N "n$n"; done
  wait_for "$NODES idle nodes" 150 bash -c "[ \"\$(sinfo -h -t idle -o %D)\" = $NODES ]"; lap "slurmd x$NODES idle"
  sinfo
}

status() {  # up = controller answers and every node is usable (idle, allocated or mixed)
  scontrol ping 2>/dev/null | grep -q UP || return 1
  [ "$(sinfo -h -t idle,alloc,mix -o %D 2>/dev/null | awk '{n += $1} END {print n + 0}')" -ge "$NODES" ]; }

case "${1:-}" in
  up) up ;;
  status) status ;;
  down) down ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  run) shift; trap down EXIT; up; rc=0; "$@" || rc=$?; exit $rc ;;
  *) echo "usage: $0 up|down|status|env|run CMD..." >&2; exit 2 ;;
esac
