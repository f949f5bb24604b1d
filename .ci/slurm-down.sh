#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by .ci/slurm-up.sh: cancel its jobs, then stop slurmd,
# slurmctld and munged by the PIDs in their pid files (nothing else is signalled). Idempotent.
set -uo pipefail

log() { echo "slurm-down: $*" >&2; }

if [ -f /etc/slurm/slurm.conf ] && ! head -1 /etc/slurm/slurm.conf | grep -q 'written by .ci/slurm-up.sh'; then
  log "/etc/slurm/slurm.conf was not written by .ci/slurm-up.sh: leaving this SLURM alone"; exit 0
fi

command -v scancel >/dev/null 2>&1 && timeout 10 scancel --user=root --quiet 2>/dev/null

stop() {  # stop <name> <pid file>
  local name=$1 pidfile=$2 pid
  [ -s "$pidfile" ] || { log "$name: not running (no $pidfile)"; return 0; }
  pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null; then log "$name: not running"; rm -f "$pidfile"; return 0; fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then log "$name did not stop in 10 s: SIGKILL"; kill -KILL "$pid"; fi
  rm -f "$pidfile"
}

stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop munged /run/munge/munged.pid
exit 0
