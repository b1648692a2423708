#!/usr/bin/env bash
# Open MPI's (PRRTE's) ssh launch agent (plm_ssh_agent; "rsh" in older releases) for the virtual cluster: called as `agent.sh [ssh options] HOST COMMAND...`
# like ssh, it runs COMMAND in HOST's network and UTS namespaces instead of logging in anywhere.
set -euo pipefail
STATE=${VCLUSTER_STATE:-/run/caldera-vcluster}
PREFIX=${VCLUSTER_PREFIX:-cvc}
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done  # ssh-style options (-x, -o ...) mean nothing here
host=${1:?agent.sh: no host given}; shift
case $host in
  vnode[0-9]*) i=${host#vnode} ;;
  *) i=$(awk -v h="$host" '$1 == h {print NR - 1}' "$STATE/hostfile") ;;
esac
[ -n "$i" ] && [ -e "$STATE/uts/n$i" ] || { echo "agent.sh: '$host' is not a node of the virtual cluster" >&2; exit 255; }
exec ip netns exec "$PREFIX-n$i" nsenter --uts="$STATE/uts/n$i" -- /bin/sh -c "$*"
