#!/usr/bin/env bash
# A RabbitMQ cluster on this machine, on loopback ports of its own, for trying the relay
# against several nodes and for the cluster tests. It never touches a node it did not start:
# each cluster has its own node names, ports, data directory and Erlang cookie, and refuses to
# start on a port or node name that is already taken.
#
#   deploy/rabbitmq/local-cluster.sh up            start the nodes and join them (about 20 s)
#   deploy/rabbitmq/local-cluster.sh status        which nodes run, and the cluster's view
#   deploy/rabbitmq/local-cluster.sh urls          the relay's amqp.urls for this cluster
#   deploy/rabbitmq/local-cluster.sh kill N        SIGKILL node N (a crash)
#   deploy/rabbitmq/local-cluster.sh stop N        stop node N cleanly
#   deploy/rabbitmq/local-cluster.sh start N       start node N again (after kill or stop)
#   deploy/rabbitmq/local-cluster.sh freeze N      SIGSTOP node N (a hung node: a GC pause, a
#                                                  stuck disk, a frozen VM)
#   deploy/rabbitmq/local-cluster.sh thaw N        SIGCONT node N
#   deploy/rabbitmq/local-cluster.sh ctl N ARGS    rabbitmqctl against node N
#   deploy/rabbitmq/local-cluster.sh cli N TOOL ARGS   another CLI tool (rabbitmq-upgrade,
#                                                  rabbitmq-queues, rabbitmq-diagnostics)
#   deploy/rabbitmq/local-cluster.sh down          stop every node and delete the data
#
# Settings, from the environment:
#   CLUSTER_NAME   node name prefix (default hhr: nodes hhr1@localhost, hhr2@localhost, ...)
#   CLUSTER_NODES  how many nodes `up` starts (default 3; 1 gives a broker of your own)
#   CLUSTER_PORT   AMQP port of node 1 (default 5681); node N listens on CLUSTER_PORT + N - 1,
#                  and its Erlang distribution on that port + 20000
#   CLUSTER_DIR    data, logs, cookie (default ${TMPDIR:-/tmp}/hirehop-relay-cluster-NAME)
#   RABBITMQ_BIN   where rabbitmq-server and its tools are (default: Debian's
#                  /usr/lib/rabbitmq/bin, else the directory of rabbitmq-server on PATH)
#
# The nodes run as the user who runs this script (not through Debian's wrapper, which would
# switch to the rabbitmq user and its cookie), with no plugins and, with three nodes or more,
# cluster_partition_handling = pause_minority. Each uses 120-150 MiB when idle.
set -euo pipefail

name=${CLUSTER_NAME:-hhr}
nodes=${CLUSTER_NODES:-3}
base_port=${CLUSTER_PORT:-5681}
dir=${CLUSTER_DIR:-${TMPDIR:-/tmp}/hirehop-relay-cluster-$name}
wait_secs=120
# A node or CLI tool that crashes writes its dump here, not into the working directory.
export ERL_CRASH_DUMP=$dir/erl_crash.dump

if [[ -z ${RABBITMQ_BIN:-} ]]; then
  if [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]; then
    RABBITMQ_BIN=/usr/lib/rabbitmq/bin
  elif command -v rabbitmq-server >/dev/null 2>&1; then
    RABBITMQ_BIN=$(dirname "$(readlink -f "$(command -v rabbitmq-server)")")
  else
    echo "error: rabbitmq-server not found; install it (Debian: apt-get install rabbitmq-server) or set RABBITMQ_BIN" >&2
    exit 1
  fi
fi

die() {
  echo "error: $*" >&2
  exit 1
}

node_name() { echo "$name$1@localhost"; }
amqp_port() { echo $((base_port + $1 - 1)); }
pid_file() { echo "$dir/$name$1.pid"; }

# The numbers of the nodes `up` started, running or not.
known_nodes() {
  [[ -s $dir/nodes ]] || return 0
  seq 1 "$(cat "$dir/nodes")"
}

pid_of() {
  local file
  file=$(pid_file "$1")
  [[ -s $file ]] || die "node $1 ($(node_name "$1")) was never started here"
  cat "$file"
}

running() {
  local pid
  pid=$(cat "$(pid_file "$1")" 2>/dev/null) || return 1
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

# The CLI tools find the cookie in $HOME/.erlang.cookie.
tool() {
  local program=$1
  shift
  HOME=$dir "$RABBITMQ_BIN/$program" "$@"
}

ctl() {
  local n=$1
  shift
  tool rabbitmqctl -n "$(node_name "$n")" "$@"
}

registered() {
  epmd -names 2>/dev/null | grep -q "^name $name$1 at port "
}

port_taken() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start_node() {
  local n=$1 port
  port=$(amqp_port "$n")
  running "$n" && return 0
  for p in "$port" $((port + 20000)); do
    port_taken "$p" && die "port $p is in use: choose other ports with CLUSTER_PORT"
  done
  # epmd forgets a killed node's name a moment after the process is gone.
  local tries=0
  while registered "$n"; do
    ((++tries <= 50)) || die "a node named $(node_name "$n") already runs on this machine and is not ours: choose another CLUSTER_NAME"
    sleep 0.2
  done
  # A killed node leaves its pid file behind: `wait` must not read the old pid.
  rm -f "$(pid_file "$n")"
  HOME=$dir \
    RABBITMQ_NODENAME=$(node_name "$n") \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT=$port \
    RABBITMQ_DIST_PORT=$((port + 20000)) \
    RABBITMQ_MNESIA_BASE=$dir/mnesia \
    RABBITMQ_LOG_BASE=$dir/log \
    RABBITMQ_PID_FILE=$(pid_file "$n") \
    RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins \
    RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf \
    "$RABBITMQ_BIN/rabbitmq-server" -detached
}

await_node() {
  local n=$1
  if ! ctl "$n" wait "$(pid_file "$n")" --timeout "$wait_secs" >/dev/null; then
    local log=$dir/log/$(node_name "$n").log
    echo "the end of $log:" >&2
    tail -n 40 "$log" >&2 2>/dev/null || true
    die "node $(node_name "$n") did not start within ${wait_secs}s"
  fi
}

up() {
  mkdir -p "$dir/log" "$dir/mnesia"
  if [[ ! -s $dir/.erlang.cookie ]]; then
    # The nodes and the CLI tools share it; nothing else on the machine knows it.
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/.erlang.cookie")
    chmod 400 "$dir/.erlang.cookie"
  fi
  : >"$dir/enabled_plugins"
  echo "$nodes" >"$dir/nodes"
  if ((nodes >= 3)); then
    # A minority of nodes (one of three, cut off or hung) pauses instead of going on alone,
    # so the cluster never splits into two halves that both accept publishes. With one or
    # two nodes every node is a minority once one is lost: RabbitMQ's default then.
    echo "cluster_partition_handling = pause_minority" >"$dir/rabbitmq.conf"
  else
    : >"$dir/rabbitmq.conf"
  fi
  local n
  for ((n = 1; n <= nodes; n++)); do
    start_node "$n"
  done
  for ((n = 1; n <= nodes; n++)); do
    await_node "$n"
  done
  for ((n = 2; n <= nodes; n++)); do
    if ! ctl 1 cluster_status --formatter json 2>/dev/null | grep -q "\"$(node_name "$n")\""; then
      ctl "$n" stop_app >/dev/null
      ctl "$n" join_cluster "$(node_name 1)" >/dev/null
      ctl "$n" start_app >/dev/null
    fi
  done
  ctl 1 await_online_nodes "$nodes" --timeout "$wait_secs" >/dev/null 2>&1 || true
  echo "cluster $name is up: $nodes node(s); amqp.urls:"
  urls
}

urls() {
  local n list=()
  for n in $(known_nodes); do
    list+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f")
  done
  ((${#list[@]})) || die "no node of cluster $name was started"
  (
    IFS=,
    echo "${list[*]}"
  )
}

status() {
  local n first=
  for n in $(known_nodes); do
    if running "$n"; then
      local state=running
      [[ $(ps -o stat= -p "$(pid_of "$n")" 2>/dev/null) == T* ]] && state=frozen
      echo "$(node_name "$n") amqp 127.0.0.1:$(amqp_port "$n") pid $(pid_of "$n") $state"
      [[ -z $first && $state == running ]] && first=$n
    else
      echo "$(node_name "$n") amqp 127.0.0.1:$(amqp_port "$n") stopped"
    fi
  done
  [[ -n $first ]] && ctl "$first" cluster_status
  return 0
}

down() {
  local n pid
  for n in $(known_nodes); do
    running "$n" || continue
    pid=$(pid_of "$n")
    # A frozen node cannot stop itself.
    kill -CONT "$pid" 2>/dev/null || true
    timeout 30 bash -c "HOME='$dir' '$RABBITMQ_BIN/rabbitmqctl' -n '$(node_name "$n")' stop >/dev/null 2>&1" || true
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$dir"
  echo "cluster $name is down"
}

node_arg() {
  [[ ${1:-} =~ ^[0-9]+$ && $1 -ge 1 ]] || die "name a node by its number, 1 for $(node_name 1)"
}

command=${1:-}
shift || true
case $command in
  up) up ;;
  down) down ;;
  status) status ;;
  urls) urls ;;
  kill)
    node_arg "${1:-}"
    pid=$(pid_of "$1")
    kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    ;;
  stop)
    node_arg "${1:-}"
    ctl "$1" stop >/dev/null
    ;;
  start)
    node_arg "${1:-}"
    start_node "$1"
    await_node "$1"
    ;;
  freeze)
    node_arg "${1:-}"
    kill -STOP "$(pid_of "$1")"
    ;;
  thaw)
    node_arg "${1:-}"
    kill -CONT "$(pid_of "$1")"
    ;;
  ctl)
    node_arg "${1:-}"
    ctl "$@"
    ;;
  cli)
    node_arg "${1:-}"
    n=$1 program=${2:-}
    [[ -n $program ]] || die "usage: cli N TOOL ARGS..."
    shift 2
    tool "$program" -n "$(node_name "$n")" "$@"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
