#!/usr/bin/env bash
# A single-node SLURM on this machine, for the tests (tests/test_slurm.py) and CI: installs Debian's slurm-wlm
# and munge if missing (root + apt only), writes a slurm.conf naming this host with partition `debug`, starts
# munged, slurmctld and slurmd, and waits until `sinfo` shows the node idle. Idempotent: a running cluster is
# left alone. Prints one line; exits non-zero with the reason when SLURM cannot be had.
#   scripts/slurm_local.sh            # install if needed, start
#   SLURM_LOCAL_NO_INSTALL=1 scripts/slurm_local.sh   # start only
set -uo pipefail

fail() { echo "slurm_local: $*" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  [ "${SLURM_LOCAL_NO_INSTALL:-0}" = 1 ] && fail "slurm-wlm/munge not installed"
  [ "$(id -u)" = 0 ] || fail "slurm-wlm/munge not installed and not root"
  command -v apt-get >/dev/null || fail "slurm-wlm/munge not installed and no apt-get"
  # apt can be slow or offline: bounded, and the tests skip rather than fail when it gives up
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq >/dev/null 2>&1
  timeout 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
    || fail "apt-get install slurm-wlm munge failed"
fi

host=$(hostname -s)
if sinfo -h -N -o "%N %T" 2>/dev/null | grep -q "^$host idle"; then
  echo "slurm_local: node $host idle (already running)"; exit 0
fi
[ "$(id -u)" = 0 ] || fail "SLURM not running and not root (cannot start daemons)"

# munge: a key and a running daemon (slurm authenticates every RPC through it)
mkdir -p /etc/munge /var/run/munge /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /var/run/munge /var/log/munge /var/lib/munge 2>/dev/null
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged --force || fail "munged did not start"

# What a container allows: no cgroup plugins (proctrack/linuxproc, task/none), no accounting daemon.
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/var/run/slurmctld.pid
SlurmdPidFile=/var/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
# fast turnaround for tests: requeued jobs start again at once, killed jobs go quickly
KillWait=30
MinJobAge=300
SchedulerParameters=defer_batch=0
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld || fail "slurmctld did not start (/var/log/slurm/slurmctld.log)"
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd || fail "slurmd did not start (/var/log/slurm/slurmd.log)"
for _ in $(seq 60); do
  state=$(sinfo -h -N -o "%N %T" 2>/dev/null | awk -v h="$host" '$1 == h {print $2}')
  case "$state" in
    idle) echo "slurm_local: node $host idle, partition debug, $cpus CPUs, ${mem} MB"; exit 0 ;;
    down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 ;;
  esac
  sleep 1
done
fail "node $host not idle after 60 s (state: ${state:-none}; see /var/log/slurm/)"
