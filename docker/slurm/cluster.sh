#!/usr/bin/env bash
# A small, real SLURM cluster for tests and demos: munge + slurmctld + slurmd.
#
#   cluster.sh start [--nodes N]
#                       install slurm-wlm/munge if missing, write the config, start the daemons,
#                       wait until the node(s) accept jobs; does nothing for what already runs
#   cluster.sh stop     cancel the cluster's jobs and stop only the daemons this script started
#   cluster.sh status   print the daemons' and nodes' state; exit 1 unless everything is up
#
# Everything (config, state, logs, pid files, the jobcomp file) lives under one directory,
# $PREEMPTIBLE_SLURM_DIR (default /tmp/preemptible-slurm). Clients need SLURM_CONF: `start`
# prints the export line and writes it to $PREEMPTIBLE_SLURM_DIR/env.sh.
#
# Default role `all`: every daemon on this machine. With one node (the default) the node is
# called `localhost`. With `--nodes N` (or PREEMPTIBLE_SLURM_NODE_COUNT=N, N >= 2; CI uses 2) it
# runs N slurmd, one per node `n1`..`nN`: node i listens on 127.0.0.(i+1) and port 6817+i, with
# its own spool dir, pid file and log (`%n` in slurm.conf), `NodeHostname=localhost`, and the
# names in /etc/hosts (Lightning resolves the first node's name as MASTER_ADDR). Every node
# reports this machine's CPUs, so N nodes offer N times the real cores: fine for tests that
# preempt and requeue, not for speed. The node count of a running cluster is kept in
# $PREEMPTIBLE_SLURM_DIR/nodes; `stop` and `status` read it.
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
NODE_COUNT="${PREEMPTIBLE_SLURM_NODE_COUNT:-}"
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

COMMAND="${1:-}"
(($#)) && shift
while (($#)); do
  case "$1" in
    --nodes) [[ $# -ge 2 ]] || die "--nodes needs a number"; NODE_COUNT="$2"; shift 2 ;;
    --nodes=*) NODE_COUNT="${1#--nodes=}"; shift ;;
    *) echo "usage: $0 start [--nodes N] | stop | status (unknown argument '$1')" >&2; exit 2 ;;
  esac
done
# `stop`/`status` (and a `start` that finds the cluster up) use the count the cluster was started with.
if [[ -z "$NODE_COUNT" ]]; then
  NODE_COUNT="$(cat "$DIR/nodes" 2>/dev/null || echo 1)"
fi
[[ "$NODE_COUNT" =~ ^[1-9][0-9]?$ ]] || die "--nodes must be a number from 1 to 99 (got '$NODE_COUNT')"

# LOCAL_NODES: the slurmd this host runs.
case "$ROLE" in
  all)
    if ((NODE_COUNT == 1)); then
      LOCAL_NODES=(localhost)
    else
      LOCAL_NODES=()
      for ((i = 1; i <= NODE_COUNT; i++)); do LOCAL_NODES+=("n$i"); done
    fi ;;
  controller) LOCAL_NODES=() ;;
  compute) LOCAL_NODES=("${PREEMPTIBLE_SLURM_NODE_NAME:-$(hostname -s)}") ;;
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

# Several nodes on one machine: each node name must resolve to its own loopback address.
ensure_hosts_entries() {
  local i name addr
  for ((i = 1; i <= NODE_COUNT; i++)); do
    name="n$i" addr="127.0.0.$((i + 1))"
    if ! grep -qE "^$addr[[:space:]]+$name([[:space:]]|\$)" /etc/hosts; then
      getent hosts "$name" >/dev/null && die "$name resolves elsewhere ($(getent hosts "$name")); fix /etc/hosts"
      printf '%s %s\n' "$addr" "$name" >>/etc/hosts
    fi
  done
}

write_conf() {
  local nodeline figures i
  figures="$(node_figures)"
  if [[ "$ROLE" == all && "$NODE_COUNT" -gt 1 ]]; then
    nodeline=""
    for ((i = 1; i <= NODE_COUNT; i++)); do
      nodeline+="NodeName=n$i NodeAddr=127.0.0.$((i + 1)) NodeHostname=localhost Port=$((6817 + i)) $figures State=UNKNOWN"$'\n'
    done
  elif [[ "$NODES" == localhost ]]; then
    nodeline="NodeName=localhost NodeAddr=127.0.0.1 $figures State=UNKNOWN"
  else
    nodeline="NodeName=$NODES $figures State=UNKNOWN"
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
$nodeline
PartitionName=low Nodes=ALL Default=YES PriorityTier=1 GraceTime=20 MaxTime=UNLIMITED State=UP
PartitionName=high Nodes=ALL PriorityTier=10 MaxTime=UNLIMITED State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  echo "$NODE_COUNT" >"$DIR/nodes"
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

start_slurmd() {  # node name
  pid_alive "$DIR/slurmd-$1.pid" slurmd && return 0
  mkdir -p "$DIR/slurmd/$1"
  slurmd -N "$1"
}

any_local_slurmd_alive() {
  local node
  for node in "${LOCAL_NODES[@]}"; do pid_alive "$DIR/slurmd-$node.pid" slurmd && return 0; done
  return 1
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
  if ! pid_alive "$DIR/slurmctld.pid" slurmctld && ! any_local_slurmd_alive; then
    write_conf
  else
    local running
    running="$(cat "$DIR/nodes" 2>/dev/null || echo 1)"
    [[ "$running" == "$NODE_COUNT" ]] \
      || die "the running cluster has $running node(s), not $NODE_COUNT: run '$0 stop' first"
  fi
  [[ "$ROLE" == all && "$NODE_COUNT" -gt 1 ]] && ensure_hosts_entries
  start_munge
  local node
  case "$ROLE" in
    all) start_slurmctld; for node in "${LOCAL_NODES[@]}"; do start_slurmd "$node"; done ;;
    controller)
      # slurmctld looks the nodes up when it starts; containers get their DNS names as they start.
      local node
      for node in ${NODES//,/ }; do wait_until "host $node to resolve" getent hosts "$node"; done
      start_slurmctld ;;
    compute) wait_until "slurmctld on $CONTROLLER" scontrol ping; start_slurmd "${LOCAL_NODES[0]}" ;;
  esac
  # A host waits for its own nodes only: a controller does not depend on the order hosts come up.
  for node in "${LOCAL_NODES[@]}"; do wait_until "node $node to become idle" node_up "$node"; done
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
  local node
  for node in "${LOCAL_NODES[@]}"; do stop_daemon "$DIR/slurmd-$node.pid" slurmd; done
  [[ "$ROLE" != compute ]] && stop_daemon "$DIR/slurmctld.pid" slurmctld
  stop_daemon "$MUNGE_DIR/munged.pid" munged
  log "stopped"
}

cmd_status() {
  local ok=0 line pid
  report() {  # name, pidfile, comm
    if pid="$(pid_of "$2" "$3")"; then line="running (pid $pid)"; else line="not running"; ok=1; fi
    printf '%-12s %s\n' "$1" "$line"
  }
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    printf '%-10s %s\n' munged "answering"
  else
    printf '%-10s %s\n' munged "not answering"; ok=1
  fi
  [[ "$ROLE" != compute ]] && report slurmctld "$DIR/slurmctld.pid" slurmctld
  local node
  for node in "${LOCAL_NODES[@]}"; do report "slurmd $node" "$DIR/slurmd-$node.pid" slurmd; done
  if [[ -e "$CONF" ]] && scontrol ping >/dev/null 2>&1; then
    sinfo -N -o '%N %P %t' || true
    for node in "${LOCAL_NODES[@]}"; do node_up "$node" || ok=1; done
  else
    ok=1
  fi
  printf 'export SLURM_CONF=%s\n' "$CONF"
  return "$ok"
}

case "$COMMAND" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start [--nodes N] | stop | status" >&2; exit 2 ;;
esac
