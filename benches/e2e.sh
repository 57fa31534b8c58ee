#!/usr/bin/env bash
# End-to-end benchmark: mover against the tools operators use today, side by side, in one run.
#
#   benches/e2e.sh [--size 2G] [--small-files 4000] [--dir DIR] [--only LIST] [--keep]
#                  [--link RATE]
#
# With --link RATE (root only), every host runs in its own network namespace on a bridge, with
# its uplink limited to RATE (tc tbf, e.g. 100mbit) and an address in 198.18.0.0/24 (the range
# set aside for benchmarks); the controller runs in west1's namespace. The link, not this
# machine's shared CPUs and disk, then limits each hop, as between real hosts.
#
# Starts four release-build agents on loopback (west1, east1, east2, east3), generates a
# DB-like data directory (large ~2x-compressible files plus thousands of small ones), and times:
#   mover-1to1     mover send west1 -> east1
#   mover-chain3   mover send west1 -> east1 -> east2 -> east3 (chain)
#   mover-star3    mover send west1 -> {east1, east2, east3} (star)
#   mover-raw-1to1, mover-raw-chain3   the same with --compress off (loopback is not short of
#                  bandwidth, so compression only costs CPU there)
#   tarzstd-1to1   tar -c | zstd -1 | nc  ->  nc | zstd -d | tar -x, then sync
#   tarzstd-serial3  the same three times one after the other (what tprovision does)
#   tar-1to1       tar -c | nc  ->  nc | tar -x, then sync
#   sshtar-1to1    tar -c | ssh east1 'tar -x' (the xtrabackup | ssh | tar shape), then sync
#   rsync-1to1     rsync -a to an rsync daemon on east1 (no ssh), then sync
#   scp-1to1       scp -r to east1's sshd, then sync
#   cp-local       cp -a of the tree on this machine, then sync: the local disk's limit
# and prints seconds, MB/s, the ratio to mover-1to1, and each agent's peak RSS (VmHWM).
# Every scenario starts with empty targets and a warm page cache on the source (same for all).
# mover encrypts (TLS 1.3) and verifies every chunk at every hop; the tar pipes do neither.
set -euo pipefail

size=2G
small=4000
dir=""
only="mover-1to1,mover-chain3,mover-star3,mover-raw-1to1,mover-raw-chain3,tarzstd-1to1,tarzstd-serial3,tar-1to1,sshtar-1to1,rsync-1to1,scp-1to1,cp-local"
keep=0
link=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --small-files) small=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --link) link=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

top=$(cd "$(dirname "$0")/.." && pwd)
need() { command -v "$1" >/dev/null 2>&1; }
if ! need nc || ! need zstd || ! need rsync || ! need sshd || ! need scp; then
  if [ "$(id -u)" = 0 ] && need apt-get; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q netcat-openbsd zstd rsync \
      openssh-server openssh-client >/dev/null
  else
    echo "this benchmark needs nc (netcat-openbsd), zstd, rsync, sshd and scp" >&2; exit 1
  fi
fi
(cd "$top" && cargo build --release -q -p mover-cli)
mover="$top/target/release/mover"

if [ -z "$dir" ]; then dir=$(mktemp -d /tmp/mover-bench-XXXXXX); fi
mkdir -p "$dir"
pids=()
nodes=(west1 east1 east2 east3)
# on NODE CMD...: run a command on a host (in its namespace with --link).
on() { local n=$1; shift; if [ -n "$link" ]; then ip netns exec "mvb-$n" "$@"; else "$@"; fi; }
addr() { # host address of node index $1
  if [ -n "$link" ]; then echo "198.18.0.$(($1 + 1))"; else echo 127.0.0.1; fi
}
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$link" ]; then
    for n in "${nodes[@]}" sw; do ip netns del "mvb-$n" 2>/dev/null || true; done
  fi
  if [ "$keep" = 0 ]; then rm -rf "$dir"; else echo "kept $dir"; fi
}
trap cleanup EXIT

if [ -n "$link" ]; then
  [ "$(id -u)" = 0 ] || { echo "--link needs root (network namespaces)" >&2; exit 1; }
  ip netns add mvb-sw
  ip -n mvb-sw link add br0 type bridge
  ip -n mvb-sw link set br0 up
  for i in "${!nodes[@]}"; do
    n=${nodes[$i]}
    ip netns add "mvb-$n"
    ip link add "mvb$i" type veth peer name "mvb${i}p"
    ip link set "mvb$i" netns "mvb-$n"
    ip link set "mvb${i}p" netns mvb-sw
    ip -n mvb-sw link set "mvb${i}p" master br0 up
    ip -n "mvb-$n" link set lo up
    ip -n "mvb-$n" link set "mvb$i" name eth0
    ip -n "mvb-$n" addr add "$(addr "$i")/24" dev eth0
    ip -n "mvb-$n" link set eth0 up
    # Each host's uplink is RATE: what it sends, it sends at most this fast.
    ip netns exec "mvb-$n" tc qdisc add dev eth0 root tbf rate "$link" burst 256kb latency 100ms
  done
fi
"$mover" certs init --out "$dir/certs" --nodes "$(IFS=,; echo "${nodes[*]}")" >/dev/null
{
  printf '[tls]\nca = "certs/ca.pem"\ncert = "certs/controller.pem"\nkey = "certs/controller.key"\n'
  port=47100
  for i in "${!nodes[@]}"; do
    n=${nodes[$i]}
    port=$((port + 1))
    printf '[nodes.%s]\naddress = "%s:%s"\n' "$n" "$(addr "$i")" "$port"
    mkdir -p "$dir/$n"
    printf 'node = "%s"\nlisten = "%s:%s"\nstate_dir = "%s/state"\n[tls]\nca = "certs/ca.pem"\ncert = "certs/%s.pem"\nkey = "certs/%s.key"\n[datasets.data]\npath = "%s/data"\n' \
      "$n" "$(addr "$i")" "$port" "$n" "$n" "$n" "$n" > "$dir/$n.toml"
  done
} > "$dir/cluster.toml"

echo "generating a $size sample data directory ($small small files) in $dir/west1/data ..."
"$mover" sample --out "$dir/west1/data" --size "$size" --small-files "$small" >/dev/null
bytes=$(du -sb --apparent-size "$dir/west1/data" | cut -f1)
zbytes=$(tar -C "$dir/west1/data" -cf - . | zstd -1 -T1 -c | wc -c)
echo "  $bytes bytes; zstd -1 of the tar stream: $zbytes bytes ($(awk "BEGIN{printf \"%.2f\", $bytes/$zbytes}")x)"
# Warm the source's page cache for every contender alike.
tar -C "$dir/west1/data" -cf - . > /dev/null

for n in "${nodes[@]}"; do
  # Started directly (not through a shell function) so that $! is the agent for VmHWM.
  if [ -n "$link" ]; then
    ip netns exec "mvb-$n" "$mover" agent --config "$dir/$n.toml" > "$dir/$n.log" 2>&1 &
  else
    "$mover" agent --config "$dir/$n.toml" > "$dir/$n.log" 2>&1 &
  fi
  pids+=($!)
done
for n in "${nodes[@]}"; do
  for _ in $(seq 1 200); do grep -q "agent listening" "$dir/$n.log" && break; sleep 0.05; done
done

now() { date +%s.%N; }
clear_targets() { for n in east1 east2 east3; do rm -rf "$dir/$n/data" "$dir/$n/recv"; done; sync; }
results=()
record() { results+=("$1 $2"); printf '  %-16s %8.2f s\n' "$1" "$2"; }

run_mover() { # name topology targets [extra flags]
  clear_targets
  local t0 t1 out
  t0=$(now)
  out=$(on west1 "$mover" send --cluster "$dir/cluster.toml" --from west1:data --to "$3" --topology "$2" --json "${@:4}") || {
    echo "$out" >&2; echo "mover send failed" >&2; exit 1; }
  t1=$(now)
  record "$1" "$(awk "BEGIN{print $t1-$t0}")"
}

pipe_copy() { # compress(0/1) target-index port
  local tdir="$dir/east$2/recv" a
  a=$(addr "$2")
  mkdir -p "$tdir"
  if [ "$1" = 1 ]; then
    (on "east$2" nc -l "$a" "$3" | zstd -d -q | tar -C "$tdir" -xf -) &
  else
    (on "east$2" nc -l "$a" "$3" | tar -C "$tdir" -xf -) &
  fi
  local rx=$!
  sleep 0.3
  if [ "$1" = 1 ]; then
    tar -C "$dir/west1/data" -cf - . | zstd -1 -T1 -q -c | on west1 nc -N "$a" "$3"
  else
    tar -C "$dir/west1/data" -cf - . | on west1 nc -N "$a" "$3"
  fi
  wait "$rx"
}

run_pipe() { # name compress count
  clear_targets
  local t0 t1 i
  t0=$(now)
  for i in $(seq 1 "$3"); do pipe_copy "$2" "$i" $((47200 + i)); done
  sync
  t1=$(now)
  record "$1" "$(awk "BEGIN{print $t1-$t0}")"
}

# The peers that need a server on east1: an rsync daemon and an sshd of our own (root login
# with a key made here, on ports of our own), started only when a scenario wants them.
netns_east1=""
if [ -n "$link" ]; then netns_east1="ip netns exec mvb-east1"; fi
start_servers() {
  local a; a=$(addr 1)
  mkdir -p "$dir/east1/recv" "$dir/ssh"
  if [[ ",$only," == *,rsync-1to1,* ]]; then
    printf 'use chroot = false\n[recv]\npath = %s/east1/recv\nread only = false\nuid = root\ngid = root\n' \
      "$dir" > "$dir/rsyncd.conf"
    # Started directly (not through `on`) so that $! is the daemon itself, for cleanup.
    $netns_east1 rsync --daemon --no-detach --address "$a" --port 47301 \
      --config "$dir/rsyncd.conf" --log-file "$dir/rsyncd.log" > /dev/null 2>&1 &
    pids+=($!)
  fi
  if [[ ",$only," == *,scp-1to1,* || ",$only," == *,sshtar-1to1,* ]]; then
    [ "$(id -u)" = 0 ] || { echo "scp-1to1 and sshtar-1to1 need root (an sshd of our own)" >&2; exit 1; }
    ssh-keygen -q -t ed25519 -N '' -f "$dir/ssh/host" <<< y >/dev/null
    ssh-keygen -q -t ed25519 -N '' -f "$dir/ssh/client" <<< y >/dev/null
    cp "$dir/ssh/client.pub" "$dir/ssh/authorized_keys"
    mkdir -p /run/sshd
    $netns_east1 /usr/sbin/sshd -D -e -p 47302 -o ListenAddress="$a" -h "$dir/ssh/host" \
      -o AuthorizedKeysFile="$dir/ssh/authorized_keys" -o PermitRootLogin=prohibit-password \
      -o StrictModes=no -o PidFile=none > /dev/null 2> "$dir/sshd.log" &
    pids+=($!)
  fi
  sleep 0.5
}
ssh_opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR)

run_peer() { # name: one copy to east1 by a tool users use today, then sync
  clear_targets
  local t0 t1 a; a=$(addr 1)
  mkdir -p "$dir/east1/recv"
  t0=$(now)
  case "$1" in
    sshtar-1to1)
      tar -C "$dir/west1/data" -cf - . | on west1 ssh "${ssh_opts[@]}" -i "$dir/ssh/client" \
        -p 47302 "root@$a" "tar -C '$dir/east1/recv' -xf -" ;;
    rsync-1to1)
      on west1 rsync -a "$dir/west1/data/" "rsync://$a:47301/recv/" ;;
    scp-1to1)
      on west1 scp -q -r "${ssh_opts[@]}" -i "$dir/ssh/client" -P 47302 \
        "$dir/west1/data/." "root@$a:$dir/east1/recv/" ;;
    cp-local)
      cp -a "$dir/west1/data/." "$dir/east1/recv/" ;;
  esac
  sync
  t1=$(now)
  record "$1" "$(awk "BEGIN{print $t1-$t0}")"
}

start_servers
if [ -n "$link" ]; then where="network namespaces, $link uplinks"; else where=loopback; fi
echo "running ($where, $(nproc) cores):"
IFS=, read -ra wanted <<< "$only"
for s in "${wanted[@]}"; do
  case "$s" in
    mover-1to1) run_mover "$s" chain east1 ;;
    mover-chain3) run_mover "$s" chain east1,east2,east3 ;;
    mover-star3) run_mover "$s" star east1,east2,east3 ;;
    mover-raw-1to1) run_mover "$s" chain east1 --compress off ;;
    mover-raw-chain3) run_mover "$s" chain east1,east2,east3 --compress off ;;
    tarzstd-1to1) run_pipe "$s" 1 1 ;;
    tarzstd-serial3) run_pipe "$s" 1 3 ;;
    tar-1to1) run_pipe "$s" 0 1 ;;
    sshtar-1to1|rsync-1to1|scp-1to1|cp-local) run_peer "$s" ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
done

echo
base=""
for r in "${results[@]}"; do set -- $r; [ "$1" = mover-1to1 ] && base=$2; done
printf '%-16s %9s %11s %14s\n' SCENARIO SECONDS "MB/S*" "vs mover-1to1"
for r in "${results[@]}"; do
  set -- $r
  if [ -n "$base" ]; then ratio=$(awk "BEGIN{printf \"%.2fx\", $2/$base}"); else ratio=-; fi
  printf '%-16s %9.2f %11.1f %14s\n' "$1" "$2" "$(awk "BEGIN{print $bytes/1e6/$2}")" "$ratio"
done
echo "* dataset bytes / wall seconds (for 3-target scenarios: the time to deliver all three)"
echo
echo "peak RSS per agent (VmHWM):"
for i in "${!nodes[@]}"; do
  printf '  %-6s %s\n' "${nodes[$i]}" "$(grep VmHWM "/proc/${pids[$i]}/status" | awk '{printf "%.0f MiB", $2/1024}')"
done
