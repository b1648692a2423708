#!/usr/bin/env bash
# A virtual cluster on one Linux machine: N "nodes", each a network namespace with its own hostname (UTS
# namespace), joined by veth pairs to a bridge in a hub namespace; every link shaped with tc. Open MPI runs across
# them with its rsh launch agent replaced by agent.sh (it enters the target node's namespaces instead of ssh), so
# COMM_TYPE_SHARED sees N nodes and traffic between nodes crosses the shaped links over TCP. Nothing changes in
# the host's own network namespace. Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN) and `ip`, `tc`, `nsenter`.
#
#   vcluster.sh up [--nodes N] [--link "RATE [DELAY] [loss P%]"]   make it (idempotent: an old one is replaced)
#   vcluster.sh shape "RATE [DELAY] [loss P%]" [NODE]   reshape every node's link (or one's) in place
#   vcluster.sh link NODE up|down [--until-exit PID]    take a node's link down / bring it back (in the hub);
#                                                       --until-exit: back up once PID has ended
#   vcluster.sh kill NODE                               kill -9 every process in node NODE (a crashed node's)
#   vcluster.sh exec NODE CMD...                        run CMD inside node NODE (0-based)
#   vcluster.sh mpiexec [mpiexec args...]               mpiexec from node 0 across the nodes (hostfile + agent);
#                                                       -n N without --map-by spreads the ranks evenly by node
#   vcluster.sh status | check | down                   show it / exit 0 if usable (else one line why) / remove it
#
# Presets for --link/shape: "10gbit 20us", "1gbit 100us"; "loss 5%" appends packet loss. The rate is a token
# bucket (tbf) on both directions of each node's link; delay and loss need the kernel's sch_netem (loss falls
# back to nftables where netem is missing; delay cannot, and is reported as not applied).
set -euo pipefail

PREFIX=${VCLUSTER_PREFIX:-cvc}          # namespace names: cvc-hub, cvc-n0, cvc-n1, ...
STATE=${VCLUSTER_STATE:-/run/caldera-vcluster}
SUBNET=${VCLUSTER_SUBNET:-10.213.7}     # node i is $SUBNET.(i+1)/24
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HUB=$PREFIX-hub

die() { echo "vcluster: $*" >&2; exit 2; }
node_ns() { echo "$PREFIX-n$1"; }
node_host() { echo "vnode$1"; }
nodes() { cat "$STATE/nodes" 2>/dev/null || echo 0; }

# Where namespaces are not allowed: one line naming what is missing, exit 3 (tests skip on it).
check() {
  local tool
  for tool in ip tc nsenter unshare; do
    command -v "$tool" >/dev/null || PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null \
      || { echo "vcluster: '$tool' not found (apt-get install iproute2 util-linux)"; return 3; }
  done
  [ "$(id -u)" = 0 ] || { echo "vcluster: needs root (network namespaces need CAP_NET_ADMIN)"; return 3; }
  local probe=$PREFIX-probe$$
  if ! ip netns add "$probe" 2>/dev/null; then
    echo "vcluster: this machine forbids network namespaces ('ip netns add' failed: no CAP_SYS_ADMIN/NET_ADMIN)"
    return 3
  fi
  local ok=0
  ip netns exec "$probe" ip link add v0 type veth peer name v1 2>/dev/null \
    && ip netns exec "$probe" ip link add b0 type bridge 2>/dev/null \
    && ip netns exec "$probe" tc qdisc add dev v0 root tbf rate 1gbit burst 64kb latency 50ms 2>/dev/null || ok=1
  ip netns del "$probe"
  [ $ok = 0 ] || { echo "vcluster: the kernel lacks veth, bridge or the tbf qdisc"; return 3; }
}

has_netem() {
  local probe=$PREFIX-netem$$ ok=1
  ip netns add "$probe" 2>/dev/null || return 1
  ip netns exec "$probe" tc qdisc add dev lo root netem delay 1us 2>/dev/null && ok=0
  ip netns del "$probe"
  return $ok
}

# Parse "RATE [DELAY] [loss P%]" into RATE, DELAY, LOSS.
parse_link() {
  RATE="" DELAY="" LOSS=""
  local words=($1) i=0
  while [ $i -lt ${#words[@]} ]; do
    case ${words[$i]} in
      loss) i=$((i + 1)); LOSS=${words[$i]:-}; LOSS=${LOSS%\%} ;;
      *bit|*bps|none) RATE=${words[$i]} ;;
      *s) DELAY=${words[$i]} ;;
      *) die "cannot read '${words[$i]}' in link '$1' (e.g. \"10gbit 20us\", \"1gbit 100us loss 5%\")" ;;
    esac
    i=$((i + 1))
  done
  [ -n "$RATE" ] || die "link '$1' names no rate (e.g. \"10gbit 20us\")"
}

# tbf's burst must hold at least one timer tick of traffic at the rate, or the rate is not reached.
burst_for() {
  local rate=$1 bits
  case $rate in
    *gbit) bits=$(( ${rate%gbit} * 1000000000 )) ;;
    *mbit) bits=$(( ${rate%mbit} * 1000000 )) ;;
    *kbit) bits=$(( ${rate%kbit} * 1000 )) ;;
    *) bits=1000000000 ;;
  esac
  local b=$(( bits / 8 / 250 ))  # 4 ms of traffic
  [ $b -ge 65536 ] || b=65536
  echo $b
}

# Shape one direction: ns + device. netem (delay/loss) as the root with tbf below it when the kernel has netem.
shape_dev() {
  local ns=$1 dev=$2 burst loss=$LOSS
  # Loss only as packets leave a node: a packet between two nodes crosses two links but is lost with probability P.
  [ "$dev" = eth0 ] || loss=""
  burst=$(burst_for "$RATE")
  ip netns exec "$ns" tc qdisc del dev "$dev" root 2>/dev/null || true
  [ "$RATE" != none ] || return 0  # unshaped: what veth and these CPUs deliver
  if [ "$NETEM" = 1 ] && { [ -n "$DELAY" ] || [ -n "$loss" ]; }; then
    ip netns exec "$ns" tc qdisc add dev "$dev" root handle 1: netem ${DELAY:+delay $DELAY} ${loss:+loss $loss%} \
      limit 100000
    ip netns exec "$ns" tc qdisc add dev "$dev" parent 1:1 handle 10: tbf rate "$RATE" burst "$burst" latency 100ms
  else
    ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "$RATE" burst "$burst" latency 100ms
  fi
}

# Packet loss without netem: nftables drops a random share of the packets leaving the node (as netem would).
loss_nft() {
  local ns=$1
  command -v nft >/dev/null || die "loss needs sch_netem (missing in this kernel) or nftables (apt-get install nftables)"
  ip netns exec "$ns" nft delete table inet vcluster 2>/dev/null || true
  [ -n "$LOSS" ] || return 0
  ip netns exec "$ns" nft -f - <<EOF
table inet vcluster {
  chain out { type filter hook output priority 0; oifname "eth0" numgen random mod 100 < $LOSS counter drop; }
}
EOF
}

shape() {
  parse_link "$1"
  local only=${2:-} i n
  n=$(nodes)
  NETEM=0; has_netem && NETEM=1
  # Refuse before touching any link, rather than leave them half shaped.
  [ "$NETEM" = 1 ] || [ -z "$LOSS" ] || command -v nft >/dev/null \
    || die "loss needs sch_netem (missing in this kernel) or nftables (apt-get install nftables)"
  for ((i = 0; i < n; i++)); do
    [ -z "$only" ] || [ "$only" = "$i" ] || continue
    shape_dev "$(node_ns $i)" eth0   # node -> hub
    shape_dev "$HUB" "n$i"           # hub -> node
    if [ "$NETEM" = 0 ] && command -v nft >/dev/null; then loss_nft "$(node_ns $i)"; fi
  done
  local applied="rate $RATE"
  [ -z "$DELAY" ] || { [ "$NETEM" = 1 ] && applied="$applied, delay $DELAY" \
    || applied="$applied (delay $DELAY NOT applied: this kernel has no sch_netem)"; }
  [ -z "$LOSS" ] || applied="$applied, loss $LOSS%"
  echo "$1" > "$STATE/link"
  echo "vcluster: links shaped: $applied"
}

down() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-(hub|n[0-9]+)$" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns"
    rm -rf "/etc/netns/$ns"
  done
  if [ -d "$STATE/uts" ]; then
    for f in "$STATE"/uts/*; do [ -e "$f" ] && { umount "$f" 2>/dev/null || true; }; done
  fi
  rm -rf "$STATE"
  rmdir /etc/netns 2>/dev/null || true  # only if empty: other namespaces' files stay
}

up() {
  local n=2 link="10gbit 20us"
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes) n=$2; shift 2 ;;
      --link) link=$2; shift 2 ;;
      *) die "unknown option '$1' (up [--nodes N] [--link \"10gbit 20us\"])" ;;
    esac
  done
  [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 16 ] || die "--nodes must be 1..16, not '$n'"
  check >&2 || exit 3
  down
  mkdir -p "$STATE/uts"
  echo "$n" > "$STATE/nodes"
  ip netns add "$HUB"
  ip netns exec "$HUB" ip link set lo up
  ip netns exec "$HUB" ip link add br0 type bridge
  ip netns exec "$HUB" ip link set br0 up
  local hosts="127.0.0.1 localhost"$'\n' i ns
  for ((i = 0; i < n; i++)); do hosts+="$SUBNET.$((i + 1)) $(node_host $i)"$'\n'; done
  : > "$STATE/hostfile"
  for ((i = 0; i < n; i++)); do
    ns=$(node_ns $i)
    ip netns add "$ns"
    ip netns exec "$ns" ip link set lo up
    # The veth pair is made in the hub and one end moved into the node: nothing is created in the host's namespace.
    ip netns exec "$HUB" ip link add "n$i" type veth peer name eth0 netns "$ns"
    ip netns exec "$HUB" ip link set "n$i" master br0 up
    ip netns exec "$ns" ip addr add "$SUBNET.$((i + 1))/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    # A UTS namespace kept alive by a bind mount, so every process entering the node sees its hostname.
    touch "$STATE/uts/n$i"
    unshare --uts="$STATE/uts/n$i" hostname "$(node_host $i)"
    # `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts: the node names resolve inside only.
    mkdir -p "/etc/netns/$ns"
    printf '%s' "$hosts" > "/etc/netns/$ns/hosts"
    echo "$(node_host $i) slots=${VCLUSTER_SLOTS:-2}" >> "$STATE/hostfile"
  done
  shape "$link"
  echo "vcluster: $n nodes up ($(for ((i = 0; i < n; i++)); do printf '%s=%s ' "$(node_host $i)" "$SUBNET.$((i + 1))"; done)); hostfile $STATE/hostfile"
}

in_node() {
  local i=$1; shift
  [ -e "$STATE/uts/n$i" ] || die "no node $i (bring the cluster up first: $0 up)"
  exec ip netns exec "$(node_ns "$i")" nsenter --uts="$STATE/uts/n$i" -- "$@"
}

# Copy stdin to stdout line by line; write 1 into file $1 if Open MPI says it lost a node's daemon.
watch_daemons() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do
    printf '%s\n' "$line"
    case $line in *"lost communication with a remote daemon"*|*"daemon failed to report back"*) echo 1 > "$1" ;; esac
  done
}

run_mpiexec() {
  [ -f "$STATE/hostfile" ] || die "the virtual cluster is not up ($0 up)"
  local wait_s=0 f
  for f in "$STATE"/repair-n*; do  # links still down until a job ends (link N down --until-exit PID)
    while [ -e "$f" ] && [ $wait_s -lt 600 ]; do sleep 0.1; wait_s=$((wait_s + 1)); done
  done
  local mpiexec=${MPIEXEC:-$(command -v mpiexec)} map=() a np=""
  # Without --map-by, PRRTE's default (by core, oversubscribed) piles every rank onto node 0: spread -n ranks
  # evenly instead, ranks 0..k-1 on node 0, k..2k-1 on node 1, ...
  for a in "$@"; do
    case $a in --map-by|--map-by=*) map=(none) ;; esac
  done
  if [ ${#map[@]} = 0 ]; then
    local prev=""
    for a in "$@"; do { [ "$prev" = -n ] || [ "$prev" = -np ]; } && np=$a; prev=$a; done
    [ -z "$np" ] || map=(--map-by "ppr:$(( (np + $(nodes) - 1) / $(nodes) )):node")
  fi
  [ "${map[0]:-}" != none ] || map=()
  # Ranks on other nodes get only the environment named with -x: pass on what Python and Caldera read.
  local var
  for var in PYTHONPATH PYTHONUNBUFFERED OMP_NUM_THREADS CALDERA_RESTART CALDERA_RESUME; do
    [ -z "${!var+set}" ] || map+=(-x "$var")
  done
  # Open MPI 5 (PRRTE): the launch agent enters the node's namespaces; TCP only on the cluster's subnet, and
  # ob1 with sm/tcp (UCX could talk between "nodes" through shared memory, bypassing the links). TCP keepalives
  # on the launcher's own links, so a node cut off is noticed in ~VCLUSTER_KEEPALIVE + 3 s and the job ends
  # (the default, 300 s + 9 x 20 s, leaves mpiexec waiting after every rank it can reach has gone). Waiting
  # ranks yield the core: every "node" shares this machine's cores, and a rank spinning in MPI_Wait takes one from
  # a rank still computing (measured: the MLP all-reduced across a 10gbit link went 985 -> 1975 samples/s).
  # Open MPI 5's launcher can exit 0 when it lost a node's daemon (a dead link or a killed node), even after a
  # rank's MPI_Abort ("lost communication with a remote daemon", "A daemon failed to report back"): seen here, it would make `caldera launch --max-restarts` take a failed job for a finished one. Its
  # output is passed through and watched, and that case exits 1. Stop signals are passed on to mpiexec.
  local io rc child watchers
  [ -e "$STATE/uts/n0" ] || die "no node 0 (bring the cluster up first: $0 up)"
  io=$(mktemp -d "$STATE/io.XXXXXX")  # under STATE: `down` removes what a killed run leaves
  mkfifo "$io/out" "$io/err"
  watch_daemons "$io/lost" < "$io/out" & watchers=$!
  watch_daemons "$io/lost" < "$io/err" >&2 & watchers="$watchers $!"
  ip netns exec "$(node_ns 0)" nsenter --uts="$STATE/uts/n0" -- "$mpiexec" --allow-run-as-root --oversubscribe --hostfile "$STATE/hostfile" \
    --prtemca plm_ssh_agent "$HERE/agent.sh" --prtemca plm_ssh_no_tree_spawn 1 --prtemca oob_tcp_if_include "$SUBNET.0/24" \
    --mca mpi_yield_when_idle 1 --mca pml ob1 --mca btl self,sm,tcp --mca btl_tcp_if_include "$SUBNET.0/24" \
    --mca oob_tcp_if_include "$SUBNET.0/24" --mca osc sm,rdma --mca coll ^hcoll \
    --prtemca oob_tcp_keepalive_time "${VCLUSTER_KEEPALIVE:-6}" --prtemca oob_tcp_keepalive_intvl 1 \
    --prtemca oob_tcp_keepalive_probes 3 -x VCLUSTER_STATE="$STATE" -x VCLUSTER_PREFIX="$PREFIX" ${map[@]+"${map[@]}"} "$@" \
    > "$io/out" 2> "$io/err" &
  child=$!
  for sig in TERM INT USR1; do trap "kill -s $sig $child 2>/dev/null" "$sig"; done
  while :; do
    rc=0; wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break  # else a trapped signal interrupted the wait: wait again
  done
  wait $watchers  # every line written, the verdict recorded
  [ "$rc" != 0 ] || [ ! -s "$io/lost" ] || rc=1
  rm -rf "$io"
  return "$rc"
}

kill_node() {
  local i=${1:?kill NODE}
  [ -e "$STATE/uts/n$i" ] || die "no node $i (bring the cluster up first: $0 up)"
  ip netns pids "$(node_ns "$i")" | xargs -r kill -9
}

link_state() {
  local i=$1 state=$2
  [[ $state =~ ^(up|down)$ ]] || die "link NODE up|down [--until-exit PID], not '$state'"
  ip netns exec "$HUB" ip link set "n$i" "$state"
  [ "${3:-}" = --until-exit ] || return 0
  # Repaired once process PID has ended (the job that lost the link); until then `mpiexec` waits, so that a
  # relaunch does not race the repair (its daemon on the node would fail to connect back).
  local pid=${4:?--until-exit PID}
  : > "$STATE/repair-n$i"
  setsid bash -c "while kill -0 $pid 2>/dev/null; do sleep 0.1; done
                  ip netns exec $HUB ip link set n$i up; rm -f $STATE/repair-n$i" </dev/null >/dev/null 2>&1 &
}

status() {
  [ -f "$STATE/nodes" ] || { echo "vcluster: down"; return 0; }
  echo "vcluster: $(nodes) nodes, link '$(cat "$STATE/link")', hostfile $STATE/hostfile"
  ip netns exec "$HUB" tc -s qdisc show | grep -E "^qdisc|Sent" || true
}

cmd=${1:-}; shift || true
case $cmd in
  up) up "$@" ;;
  down) down ;;
  check) check ;;
  shape) [ -f "$STATE/nodes" ] || die "the virtual cluster is not up"; shape "$@" ;;
  link) link_state "$@" ;;
  kill) kill_node "$@" ;;
  exec) in_node "$@" ;;
  mpiexec) run_mpiexec "$@" ;;
  status) status ;;
  *) die "usage: $0 up|down|check|status|shape|link|kill|exec|mpiexec (see the header of $0)" ;;
esac
