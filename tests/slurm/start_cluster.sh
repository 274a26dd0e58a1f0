#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests (the recipe for a local test cluster).
#
#   apt-get install -y --no-install-recommends slurm-wlm munge   # Debian/Ubuntu, as root
#   bash tests/slurm/start_cluster.sh                            # as root; idempotent
#   sinfo                                                        # one node, partition "debug"
#
# slurmctld and slurmd run here as root (SlurmUser=root), without cgroups
# (proctrack/linuxproc, task/none), so it works in a container. Accounting is off (no slurmdbd):
# `sacct` answers "accounting storage is disabled"; mka_exp/slurm_status.py makes submitit fall
# back to `squeue`. The node offers every CPU and all memory of the machine and no GPU.
# Stop it with: scontrol shutdown; pkill -x munged   (or: kill $(cat /run/munge/munged.pid))
set -euo pipefail

[[ $(id -u) == 0 ]] || { echo "start_cluster.sh: run as root" >&2; exit 1; }
command -v slurmctld >/dev/null || { echo "start_cluster.sh: install slurm-wlm and munge first" >&2; exit 1; }

NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
CONF=/etc/slurm/slurm.conf

# munge authenticates slurmctld <-> slurmd <-> clients; the package made /etc/munge/munge.key.
[[ -s /etc/munge/munge.key ]] || mungekey --create --force
mkdir -p /run/munge && chown munge:munge /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat >"$CONF" <<EOF
# Written by tests/slurm/start_cluster.sh: one node, one partition, no accounting, no cgroups.
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# scancel sends SIGTERM, which submitit's jobs ignore, then SIGKILL after KillWait (default 30 s).
KillWait=2
MinJobAge=600
SchedulerType=sched/backfill
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

if pgrep -x slurmctld >/dev/null; then
  scontrol reconfigure  # already running: read the new slurm.conf
else
  slurmctld
fi
pgrep -x slurmd >/dev/null || slurmd
# Ready when the node is idle (slurmd registered with slurmctld).
for _ in $(seq 60); do
  state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
  [[ $state == idle* || $state == mix* || $state == alloc* ]] && { sinfo; exit 0; }
  sleep 1
done
echo "start_cluster.sh: node $NODE not idle after 60 s (state: ${state:-none}); see /var/log/slurm/" >&2
exit 1
