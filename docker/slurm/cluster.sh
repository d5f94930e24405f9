#!/usr/bin/env bash
# A small, real SLURM cluster for tests and demos: munge + slurmctld + slurmd.
#
#   cluster.sh start    install slurm-wlm/munge if missing, write the config, start the daemons,
#                       wait until the node(s) accept jobs; does nothing for what already runs
#   cluster.sh stop     cancel the cluster's jobs and stop only the daemons this script started
#   cluster.sh status   print the daemons' and nodes' state; exit 1 unless everything is up
#
# Everything (config, state, logs, pid files, the jobcomp file) lives under one directory,
# $PREEMPTIBLE_SLURM_DIR (default /tmp/preemptible-slurm). Clients need SLURM_CONF: `start`
# prints the export line and writes it to $PREEMPTIBLE_SLURM_DIR/env.sh.
#
# Default role `all`: one node called `localhost` that runs every daemon (what CI uses).
# For a multi-host cluster (docker/compose.yaml) every host runs this script with the same
#   PREEMPTIBLE_SLURM_CONTROLLER=<controller host>  PREEMPTIBLE_SLURM_NODES=<node1,node2,...>
# and PREEMPTIBLE_SLURM_ROLE=controller or compute; each host writes the same slurm.conf.
#
# Exit codes: 0 ok, 1 failure, 3 this machine cannot run the cluster (not root, no apt).
set -euo pipefail

DIR="${PREEMPTIBLE_SLURM_DIR:-/tmp/preemptible-slurm}"
ROLE="${PREEMPTIBLE_SLURM_ROLE:-all}"
CONTROLLER="${PREEMPTIBLE_SLURM_CONTROLLER:-localhost}"
NODES="${PREEMPTIBLE_SLURM_NODES:-localhost}"
TIMEOUT="${PREEMPTIBLE_SLURM_TIMEOUT:-90}"
CONF="$DIR/slurm.conf"
MUNGE_DIR="$DIR/munge"
MUNGE_KEY=/etc/munge/munge.key
# The default socket: slurm's auth/munge plugin looks for it there.
MUNGE_RUN=/run/munge

export SLURM_CONF="$CONF"

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
unsupported() { log "cannot run a cluster here: $*"; exit 3; }

case "$ROLE" in
  all) NODE_NAME="localhost" ;;
  controller) NODE_NAME="" ;;
  compute) NODE_NAME="${PREEMPTIBLE_SLURM_NODE_NAME:-$(hostname -s)}" ;;
  *) die "PREEMPTIBLE_SLURM_ROLE must be all, controller or compute (got '$ROLE')" ;;
esac

# Poll `$@` until it succeeds, or fail after TIMEOUT seconds; never a fixed sleep. Under
# `set -e` a failed wait ends the script unless the caller handles it.
wait_until() {
  local what="$1"; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "error: timed out after ${TIMEOUT}s waiting for $what (logs in $DIR)"
      return 1
    fi
    sleep 0.5
  done
}

# True when process $1 is alive and its command is $2 (guards against pid reuse). A zombie
# counts as gone: where PID 1 reaps slowly, a stopped daemon lingers as one.
proc_alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  # /proc/PID/stat is "PID (COMM) STATE ...".
  [[ "$stat" == "$1 ($2) "* && "$stat" != "$1 ($2) Z"* ]]
}

# The pid in pid file $1 when that process is alive with command $2; fails otherwise.
pid_of() {
  local pid
  # The daemon may delete its pid file as this reads it.
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && proc_alive "$pid" "$2" && echo "$pid"
}

pid_alive() { pid_of "$1" "$2" >/dev/null; }

install_packages() {
  local missing=0 tool
  for tool in munged mungekey slurmctld slurmd sbatch scontrol; do
    command -v "$tool" >/dev/null 2>&1 || missing=1
  done
  ((missing)) || return 0
  command -v apt-get >/dev/null 2>&1 || unsupported "slurm-wlm/munge are not installed and there is no apt-get"
  log "installing slurm-wlm and munge with apt-get"
  local pkgs=(slurm-wlm munge)
  # Refresh the package lists only when the first try cannot find the packages.
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2; then
    apt-get update -q >&2 || unsupported "apt-get update failed (no network?)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2 \
      || unsupported "apt-get install ${pkgs[*]} failed"
  fi
}

# `slurmd -C` prints this host's real figures; keep them so slurmd does not drain the node
# for having fewer CPUs or less memory than configured.
node_figures() {
  slurmd -C | head -n 1 | tr ' ' '\n' \
    | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | paste -sd ' '
}

write_conf() {
  local nodeline
  if [[ "$NODES" == localhost ]]; then
    nodeline="NodeName=localhost NodeAddr=127.0.0.1 $(node_figures)"
  else
    nodeline="NodeName=$NODES $(node_figures)"
  fi
  mkdir -p "$DIR/slurmctld" "$DIR/slurmd"
  # Written to a temporary file first so a running daemon never reads half a config.
  cat >"$CONF.tmp" <<EOF
# Written by docker/slurm/cluster.sh; edits are lost on the next start.
ClusterName=preemptible
SlurmctldHost=$CONTROLLER
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Credentials live 120 s by default, and a requeued job may not start again on a node until
# its old credential expired: 10 s keeps requeue tests fast.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/slurmctld
SlurmdSpoolDir=$DIR/slurmd/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers or CI machines: track processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No slurmdbd, so no sacct: the jobcomp file keeps one line per finished attempt.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
# Schedule every 5 s instead of every 60 s so a requeued job restarts promptly.
SchedulerParameters=bf_interval=5,sched_interval=5
# Finished jobs stay visible to "scontrol show job" for a minute.
MinJobAge=60
ReturnToService=2
JobRequeue=1
# SIGTERM -> SIGKILL gap when SLURM ends a job (cancel, requeue, time limit, end of GraceTime).
KillWait=10
# A job on a higher-tier partition requeues the jobs it needs the cores of. With
# preempt_send_user_signal the victims first get their --signal (e.g. SIGUSR1 to every task)
# and then GraceTime seconds before SIGTERM.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
$nodeline State=UNKNOWN
PartitionName=low Nodes=ALL Default=YES PriorityTier=1 GraceTime=20 MaxTime=UNLIMITED State=UP
PartitionName=high Nodes=ALL PriorityTier=10 MaxTime=UNLIMITED State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  printf 'export SLURM_CONF=%s\n' "$CONF" >"$DIR/env.sh"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged (ours or the system's) already answers
  fi
  install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
  install -d -o munge -g munge -m 0700 "$MUNGE_DIR"
  if [[ ! -s "$MUNGE_KEY" ]]; then
    install -d -o munge -g munge -m 0700 "$(dirname "$MUNGE_KEY")"
    mungekey --create --keyfile="$MUNGE_KEY"
    chown munge:munge "$MUNGE_KEY"
    chmod 0600 "$MUNGE_KEY"
  fi
  # munged refuses to run as root; it forks into the background and writes its pid file.
  runuser -u munge -- /usr/sbin/munged --key-file="$MUNGE_KEY" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed"
  wait_until "munged to answer" bash -c 'munge -n </dev/null | unmunge'
}

start_slurmctld() {
  pid_alive "$DIR/slurmctld.pid" slurmctld && return 0
  # A fresh start forgets jobs of an earlier run (-c) so they cannot occupy the node; job ids
  # start again at 1, so the old jobcomp file is moved aside to keep its lines unambiguous.
  [[ -e "$DIR/jobcomp.log" ]] && mv -f "$DIR/jobcomp.log" "$DIR/jobcomp.log.old"
  slurmctld -c
  wait_until "slurmctld to answer" scontrol ping
}

start_slurmd() {
  pid_alive "$DIR/slurmd-$NODE_NAME.pid" slurmd && return 0
  mkdir -p "$DIR/slurmd/$NODE_NAME"
  slurmd -N "$NODE_NAME"
}

# A node is usable when it responds (no `*` suffix) and is neither down nor drained.
node_up() {
  local state
  state="$(sinfo -h -N -n "$1" -o %t 2>/dev/null | head -n 1)"
  [[ "$state" =~ ^(idle|mix|alloc|comp)$ ]]
}

cmd_start() {
  ((EUID == 0)) || unsupported "cluster.sh start must run as root (slurmd and munged need it)"
  install_packages
  mkdir -p "$DIR"
  chmod 0755 "$DIR"
  # A running cluster keeps its config: rewriting it under live daemons would desynchronise them.
  if ! pid_alive "$DIR/slurmctld.pid" slurmctld && ! pid_alive "$DIR/slurmd-$NODE_NAME.pid" slurmd; then
    write_conf
  fi
  start_munge
  case "$ROLE" in
    all) start_slurmctld; start_slurmd ;;
    controller)
      # slurmctld looks the nodes up when it starts; containers get their DNS names as they start.
      local node
      for node in ${NODES//,/ }; do wait_until "host $node to resolve" getent hosts "$node"; done
      start_slurmctld ;;
    compute) wait_until "slurmctld on $CONTROLLER" scontrol ping; start_slurmd ;;
  esac
  # A host waits for its own node only: a controller does not depend on the order hosts come up.
  [[ -z "$NODE_NAME" ]] || wait_until "node $NODE_NAME to become idle" node_up "$NODE_NAME"
  log "${ROLE/#all/cluster} up; state, logs and jobcomp file in $DIR"
  printf 'export SLURM_CONF=%s\n' "$CONF"
}

# Send SIGTERM to the daemon of a pid file, SIGKILL if it is still there after TIMEOUT. The
# process itself is watched: slurmctld deletes its pid file before it has finished exiting.
stop_daemon() {
  local pidfile="$1" comm="$2" pid
  pid="$(pid_of "$pidfile" "$comm")" || { rm -f "$pidfile"; return 0; }
  kill "$pid"
  local deadline=$((SECONDS + TIMEOUT))
  while proc_alive "$pid" "$comm"; do
    if ((SECONDS >= deadline)); then
      log "$comm did not stop on SIGTERM; sending SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  rm -f "$pidfile"
}

no_running_jobs() { [[ -z "$(squeue -h -t running,completing,configuring -o %i 2>/dev/null)" ]]; }

cmd_stop() {
  [[ -e "$CONF" ]] || { log "no cluster in $DIR"; return 0; }
  # Job processes belong to slurmstepd, which outlives slurmd: cancel the jobs first so no
  # training keeps running after the cluster is gone.
  if [[ "$ROLE" != compute ]] && pid_alive "$DIR/slurmctld.pid" slurmctld; then
    local jobs
    jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')" || jobs=""
    if [[ -n "${jobs// /}" ]]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086  # one argument per job id
      scancel $jobs || true
      wait_until "the cancelled jobs to end" no_running_jobs || true
    fi
  fi
  [[ -n "$NODE_NAME" ]] && stop_daemon "$DIR/slurmd-$NODE_NAME.pid" slurmd
  [[ "$ROLE" != compute ]] && stop_daemon "$DIR/slurmctld.pid" slurmctld
  stop_daemon "$MUNGE_DIR/munged.pid" munged
  log "stopped"
}

cmd_status() {
  local ok=0 line pid
  report() {  # name, pidfile, comm
    if pid="$(pid_of "$2" "$3")"; then line="running (pid $pid)"; else line="not running"; ok=1; fi
    printf '%-10s %s\n' "$1" "$line"
  }
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    printf '%-10s %s\n' munged "answering"
  else
    printf '%-10s %s\n' munged "not answering"; ok=1
  fi
  [[ "$ROLE" != compute ]] && report slurmctld "$DIR/slurmctld.pid" slurmctld
  [[ -n "$NODE_NAME" ]] && report slurmd "$DIR/slurmd-$NODE_NAME.pid" slurmd
  if [[ -e "$CONF" ]] && scontrol ping >/dev/null 2>&1; then
    sinfo -N -o '%N %P %t' || true
    [[ -z "$NODE_NAME" ]] || node_up "$NODE_NAME" || ok=1
  else
    ok=1
  fi
  printf 'export SLURM_CONF=%s\n' "$CONF"
  return "$ok"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
