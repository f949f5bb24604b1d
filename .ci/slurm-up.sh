#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (Debian 12: Slurm 22.05 + munge), for
# tests/test_slurm.py: `snakemake --profile tests/slurm` submits real sbatch jobs to it.
#
#   .ci/slurm-up.sh      install (if missing), configure, start munged + slurmctld + slurmd
#   .ci/slurm-down.sh    stop them again (by the PIDs in their pid files)
#
# Needs root. No systemd: the daemons daemonise themselves. Idempotent: if a controller already
# answers and the node is usable it does nothing; otherwise it (re)starts only what is not running.
# The node has this machine's CPUs and memory and two fake GPUs (GRES backed by /dev/fakegpu0-1,
# character devices like /dev/null): jobs asking for --gpus=2 get CUDA_VISIBLE_DEVICES=0,1 and
# run on the CPU. Partitions: cpu (default) and gpu, both on this node. No accounting daemon
# (slurmdbd): use `squeue` as the status command and no account (tests/slurm/profile.yaml).
set -euo pipefail

log() { echo "slurm-up: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root"; exit 1
fi

# Already usable (a previous run of this script, or a real cluster)? Then leave it alone.
if command -v sinfo >/dev/null 2>&1 && timeout 10 sinfo -h -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; then
  log "a SLURM controller already answers with a usable node:"; sinfo >&2; exit 0
fi

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)

# 2. munge: a key, its runtime directory, the daemon (as the munge user)
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! alive /run/munge/munged.pid; then
  log "starting munged"
  su -s /bin/sh munge -c /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge >/dev/null

# 3. fake GPUs: a GRES needs a File= that exists, or the node registers 0 GPUs and is drained
for i in 0 1; do
  [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3 2>/dev/null || touch /dev/fakegpu$i
done

# 4. configuration (only ever written by this script: a marker on the first line)
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
if [ -f /etc/slurm/slurm.conf ] && ! head -1 /etc/slurm/slurm.conf | grep -q 'written by .ci/slurm-up.sh'; then
  cp -n /etc/slurm/slurm.conf /etc/slurm/slurm.conf.before-slurm-up
fi
cat > /etc/slurm/slurm.conf <<EOF
# written by .ci/slurm-up.sh: a one-node test cluster on localhost
ClusterName=localtest
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# keep finished jobs visible to squeue for 10 min: the status command of the test profile
MinJobAge=600
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
GresTypes=gpu
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=${HOST} Default=NO MaxTime=INFINITE State=UP
EOF
cat > /etc/slurm/gres.conf <<EOF
# written by .ci/slurm-up.sh: two fake GPUs
AutoDetect=off
NodeName=${HOST} Name=gpu File=/dev/fakegpu[0-1]
EOF

# 5. daemons
if ! alive /run/slurmctld.pid; then
  log "starting slurmctld"
  slurmctld -i
fi
for _ in $(seq 60); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
if ! alive /run/slurmd.pid; then
  log "starting slurmd"
  slurmd
fi

# 6. wait for the node, resume it if it came up drained/down
state=""
for _ in $(seq 60); do
  state=$(sinfo -h -n "$HOST" -o '%t' 2>/dev/null | head -1)
  case "$state" in
    idle|mix|alloc) break ;;
    drain*|down*|drng) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
  esac
  sleep 1
done
if ! sinfo -h -o '%t' | grep -Eq '^(idle|mix|alloc)'; then
  log "node not usable (state: ${state:-none})"; sinfo -R >&2 || true
  tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  exit 1
fi
log "up:"; sinfo >&2
