#!/usr/bin/env bash
# Two (or more) "nodes" on one Linux machine: each a network + UTS namespace with its own hostname,
# joined by a veth pair (two nodes) or a bridge inside a hub namespace (three or more), with private
# addresses 10.77.0.<i>/24 and loopback up. Nothing outside the machine is addressed; the root
# namespace gets no address and no route. The nodes share the machine's file system (as cluster
# nodes share a parallel file system). Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN).
#
#   tests/netns_nodes.sh up   [TAG] [N]     make nodes node1..nodeN (default TAG=hpcdqn, N=2)
#   tests/netns_nodes.sh exec TAG NODE CMD...   run CMD inside NODE (its network and hostname)
#   tests/netns_nodes.sh rsh  ...               Open MPI rsh agent: "rsh NODE CMD..." (TAG from
#                                                HPCDQN_NETNS_TAG), runs CMD in NODE via nsenter
#   tests/netns_nodes.sh down [TAG]             kill every process inside the nodes, remove the
#                                                namespaces, links and bind mounts (idempotent)
#   tests/netns_nodes.sh info [TAG]             hostnames, addresses and interface counters
#
# Layout: network namespace "TAG-nodeI" (ip netns), UTS namespace bind-mounted at
# /run/TAG-nodes/nodeI.uts, interface "hpn0" in every node (the name Open MPI's
# btl_tcp_if_include / oob_tcp_if_include select), address 10.77.0.I/24.
#
# mpirun across the nodes (see tests/netns_nodes.py for the exact options): run mpirun inside
# node1, with a host file naming node1 and node2 and
#   --mca plm_rsh_agent "tests/netns_nodes.sh rsh" --mca btl tcp,vader,self
#   --mca btl_tcp_if_include hpn0 --mca oob_tcp_if_include hpn0
set -euo pipefail

IFACE=hpn0
SUBNET=10.77.0

die() { echo "netns_nodes.sh: $*" >&2; exit 2; }

nodes_of() {  # the node names that exist for TAG
  local tag=$1
  ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^${tag}-\(node[0-9]*\)$/\1/p" | sort -V
}

ns_exec() {  # ns_exec TAG NODE CMD...
  local tag=$1 node=$2; shift 2
  [ -e "/run/netns/${tag}-${node}" ] || die "no node '${node}' (tag ${tag}): run '$0 up ${tag}' first"
  exec nsenter --net="/run/netns/${tag}-${node}" --uts="/run/${tag}-nodes/${node}.uts" -- "$@"
}

up() {
  local tag=${1:-hpcdqn} n=${2:-2}
  [ "$(id -u)" = 0 ] || die "needs root (network and UTS namespaces)"
  [ "$n" -ge 2 ] && [ "$n" -le 200 ] || die "N=$n: use 2..200 nodes"
  [ ${#tag} -le 8 ] || die "TAG '$tag' longer than 8 characters (interface names are limited)"
  if [ -n "$(nodes_of "$tag")" ]; then die "nodes with tag '$tag' exist: run '$0 down $tag' first"; fi
  trap 'down "$tag" >/dev/null 2>&1 || true' ERR
  local dir=/run/${tag}-nodes
  mkdir -p "$dir"
  local i
  for i in $(seq 1 "$n"); do
    ip netns add "${tag}-node${i}"
    # IPv4 only: no IPv6 (not even link-local) addresses inside the nodes
    ip netns exec "${tag}-node${i}" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
      net.ipv6.conf.default.disable_ipv6=1 >/dev/null 2>&1 || true
    ip -n "${tag}-node${i}" link set lo up
    touch "$dir/node${i}.uts"
    # a persistent UTS namespace (bind mount of the namespace file), its hostname set inside it
    unshare --uts="$dir/node${i}.uts" hostname "node${i}"
  done
  if [ "$n" -eq 2 ]; then
    ip link add "${tag}a" type veth peer name "${tag}b"
    ip link set "${tag}a" netns "${tag}-node1"
    ip link set "${tag}b" netns "${tag}-node2"
    ip -n "${tag}-node1" link set "${tag}a" name "$IFACE"
    ip -n "${tag}-node2" link set "${tag}b" name "$IFACE"
  else   # a bridge in a hub namespace, one veth per node
    ip netns add "${tag}-hub"
    ip -n "${tag}-hub" link add br0 type bridge
    ip -n "${tag}-hub" link set br0 up
    for i in $(seq 1 "$n"); do
      ip link add "${tag}n${i}" type veth peer name "${tag}h${i}"
      ip link set "${tag}h${i}" netns "${tag}-hub"
      ip -n "${tag}-hub" link set "${tag}h${i}" master br0 up
      ip link set "${tag}n${i}" netns "${tag}-node${i}"
      ip -n "${tag}-node${i}" link set "${tag}n${i}" name "$IFACE"
    done
  fi
  for i in $(seq 1 "$n"); do
    ip -n "${tag}-node${i}" addr add "${SUBNET}.${i}/24" dev "$IFACE"
    ip -n "${tag}-node${i}" link set "$IFACE" up
  done
  # names resolve inside the nodes' own view only through addresses: write a hosts file the
  # launcher may use (we never edit the machine's /etc/hosts)
  : > "$dir/hosts"
  for i in $(seq 1 "$n"); do echo "${SUBNET}.${i} node${i}" >> "$dir/hosts"; done
  trap - ERR
  echo "up: tag=${tag} nodes=$(nodes_of "$tag" | tr '\n' ' ')"
}

down() {
  local tag=${1:-hpcdqn} dir=/run/${1:-hpcdqn}-nodes node ns pids
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${tag}-(node[0-9]+|hub)$" || true); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null || true; fi
  done
  sleep 0.2
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${tag}-(node[0-9]+|hub)$" || true); do
    ip netns delete "$ns" 2>/dev/null || true    # deleting a namespace deletes its veth ends
  done
  if [ -d "$dir" ]; then
    for node in "$dir"/*.uts; do
      [ -e "$node" ] || continue
      umount "$node" 2>/dev/null || true
      rm -f "$node"
    done
    rm -f "$dir/hosts"
    rmdir "$dir" 2>/dev/null || true
  fi
  # a veth left in the root namespace by an interrupted 'up'
  for l in "${tag}a" "${tag}b"; do ip link delete "$l" 2>/dev/null || true; done
  echo "down: tag=${tag}"
}

info() {
  local tag=${1:-hpcdqn} node
  for node in $(nodes_of "$tag"); do
    echo "== ${node}: hostname=$(nsenter --net="/run/netns/${tag}-${node}" --uts="/run/${tag}-nodes/${node}.uts" hostname)"
    ip -n "${tag}-${node}" -br addr
    ip -n "${tag}-${node}" -s link show "$IFACE" | sed -n '3,6p' 
  done
}

cmd=${1:-}
shift || true
case "$cmd" in
  up) up "$@" ;;
  down) down "$@" ;;
  info) info "$@" ;;
  exec) [ $# -ge 3 ] || die "usage: $0 exec TAG NODE CMD..."; ns_exec "$@" ;;
  rsh)
    # Open MPI calls the agent as: AGENT [options] HOST CMD... ; skip ssh-style options
    while [ $# -gt 0 ] && [[ $1 == -* ]]; do shift; done
    [ $# -ge 2 ] || die "rsh: usage: rsh NODE CMD..."
    host=$1; shift
    [[ $host == ${SUBNET}.* ]] && host=node${host##*.}
    # rsh semantics: the command arrives as words for a remote shell
    ns_exec "${HPCDQN_NETNS_TAG:-hpcdqn}" "$host" /bin/sh -c "$*" ;;
  *) sed -n '2,23p' "$0"; exit 2 ;;
esac
