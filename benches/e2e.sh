#!/usr/bin/env bash
# End-to-end benchmark: mover against the tools operators use today, side by side, in one run.
#
#   benches/e2e.sh [--size 2G] [--small-files 4000] [--small-only 50000] [--link RATE]
#                  [--only LIST] [--dir DIR] [--keep] [--settle SECONDS]
#
# Starts five release-build agents (west1, east1, east2, east3, east4) and times the scenarios
# of LIST (comma-separated scenario names and groups; default: all) on generated DB-like data:
#   the main tree   --size bytes: large ~2-3x zstd-compressible table and log files, plus
#                   --small-files small files (0-16 KiB)
#   the small tree  --small-only files of 256 B to 4 KiB (500 per schema directory), made
#                   only when a *-small scenario runs
# Group 1to1 (main tree, west1 -> east1):
#   mover-1to1       mover send (TLS 1.3, zstd -1, every chunk verified at every hop)
#   mover-raw-1to1   the same with --compress off
#   tarzstd-1to1     tar -c | zstd -1 | nc  ->  nc | zstd -d | tar -x
#   tar-1to1         tar -c | nc  ->  nc | tar -x
#   sshtar-1to1      tar -c | ssh east1 'tar -x' (the xtrabackup | ssh | tar shape)
#   rsync-1to1       rsync -a to an rsync daemon on east1 (no ssh)
#   scp-1to1         scp -r to an sshd of our own on east1
# Group fanout (main tree, west1 -> east1..eastN, N = 1..4):
#   mover-chainN     mover send, chained: west1 -> east1 -> east2 -> ... -> eastN
#   mover-starN      mover send, star: west1 -> each of east1..eastN at once
#   serialN          tarzstd-1to1 to east1, then to east2, ... eastN (what tprovision does)
#   mover-raw-chainN (not in a group) a chain with --compress off
# Group small (small tree, west1 -> east1): mover-small, tarzstd-small, tar-small, rsync-small
# Group all (the default): 1to1, fanout, small and cp-local (cp -a on this machine, then
# sync: the local disk's own limit).
#
# --dir DIR works there (default: a new directory under /tmp) and --keep leaves it behind; a
# later run with the same --dir reuses the source trees it finds complete.
# --link RATE (root only): every host runs in its own network namespace (mvb-*) on a bridge,
# its uplink limited to RATE by tc tbf (1gbit, 200mbit, ...; what tc accepts) and an address
# in 198.18.0.0/24 (set aside for benchmarks); the controller and the sending side of every
# peer run in west1's. Without --link everything runs on loopback and CPU is the limit.
#
# Every scenario starts with empty targets and a warm page cache on the source, and ends when
# every target has the tree and a sync returned. Empty targets: on ext4 without a journal (this
# project's CI machines) the kernel will not reuse an inode for 60 s after its delete, 360 s
# while its inode-table block is dirty (as it is once a file near it is made), and skips it one
# block lookup at a time whenever a file is created: a copy made right after a 50,000-file
# delete here took 2x-10x as long, more each round. So on such a file system the script moves
# the previous scenario's copies aside and deletes them in bulk when they pass a quarter of the
# free space, then waits --settle SECONDS (default 365 there, else 0). A run that starts within
# 6 minutes of a large delete (another run's end) starts slowed. After each bulk delete and its
# wait the script reads the source trees again and makes one untimed copy of the main tree:
# the first copy after a large delete is slower than the ones after it, whatever makes it.
# With --settle 0 every copy is deleted right away, and the first
# scenario is primed (as many empty files made and deleted before it) so that each one starts
# after a fresh delete.
# The table gives per scenario:
#   SECONDS    wall time
#   MB/S       tree bytes / SECONDS (with N targets: the time to deliver all N)
#   CPU S/GB   CPU seconds (user + system) of every process the scenario ran or talked to, on
#              all hosts, per GB of the tree: agents, rsync daemon and sshd from /proc/PID/stat
#              (utime+stime and their reaped children), everything the script started (the
#              mover controller, tar, zstd, nc, ssh, rsync, scp, sync) from the script's own
#              reaped-children times; kernel threads (writeback, softirq) are not counted
#   FILES/S    files of the tree / SECONDS (small tree only)
#   VS PEER    SECONDS / that of the fastest non-mover scenario of the same shape in this run
#              (same tree, same number of targets)
#   VS LIMIT   SECONDS / (the tree's tar stream after zstd -1, in bits / RATE): the time one
#              compressed copy needs on one link (with --link only)
# then the fan-out ratios (N targets against 1, chain 1->4 against the 1.15x goal) and each
# agent's peak RSS (VmHWM, reset before each scenario) per mover scenario.
set -euo pipefail

size=2G
small=4000
small_only=50000
dir=""
only=all
keep=0
link=""
settle_s=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --small-files) small=$2; shift 2 ;;
    --small-only) small_only=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --link) link=$2; shift 2 ;;
    --settle) settle_s=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

group() {
  case "$1" in
    1to1) echo mover-1to1,mover-raw-1to1,tarzstd-1to1,tar-1to1,sshtar-1to1,rsync-1to1,scp-1to1 ;;
    fanout) echo mover-chain1,mover-chain2,mover-chain3,mover-chain4,mover-star1,mover-star2,mover-star3,mover-star4,serial1,serial2,serial3,serial4 ;;
    small) echo mover-small,tarzstd-small,tar-small,rsync-small ;;
    all) echo "$(group 1to1),$(group fanout),$(group small),cp-local" ;;
    *) echo "$1" ;;
  esac
}
wanted=()
IFS=, read -ra items <<< "$only"
for item in "${items[@]}"; do
  IFS=, read -ra names <<< "$(group "$item")"
  for s in "${names[@]}"; do
    case "$s" in
      mover-1to1|mover-raw-1to1|tarzstd-1to1|tar-1to1|sshtar-1to1|rsync-1to1|scp-1to1) ;;
      mover-chain[1-4]|mover-star[1-4]|mover-raw-chain[1-4]|serial[1-4]|cp-local) ;;
      mover-small|tarzstd-small|tar-small|rsync-small) ;;
      *) echo "unknown scenario $s (see --help)" >&2; exit 2 ;;
    esac
    wanted+=("$s")
  done
done
[ "${#wanted[@]}" -gt 0 ] || { echo "--only selects no scenario" >&2; exit 2; }
# want PATTERN: is a scenario matching the glob PATTERN selected?
# shellcheck disable=SC2053 # the right-hand side is a glob on purpose
want() { local s; for s in "${wanted[@]}"; do [[ $s == $1 ]] && return 0; done; return 1; }
want_main() { local s; for s in "${wanted[@]}"; do [[ $s == *-small ]] || return 0; done; return 1; }

# The link rate in bits per second, from tc's units (bit, kbit, mbit, gbit, kibit, ..., bps,
# kbps, mbps (bytes!), ...), for the limit.
link_bps=""
if [ -n "$link" ]; then
  [ "$(id -u)" = 0 ] || { echo "--link needs root (network namespaces)" >&2; exit 1; }
  link_bps=$(awk -v r="$link" 'BEGIN {
    if (!match(r, /^[0-9]+(\.[0-9]+)?/)) exit 1
    n = substr(r, 1, RLENGTH); u = tolower(substr(r, RLENGTH + 1))
    split("bit 1 kbit 1e3 mbit 1e6 gbit 1e9 tbit 1e12 kibit 1024 mibit 1048576 gibit 1073741824 bps 8 kbps 8e3 mbps 8e6 gbps 8e9 kibps 8192 mibps 8388608 gibps 8589934592", t, " ")
    m[""] = 1; for (i = 1; i < length(t); i += 2) m[t[i]] = t[i + 1]
    if (!(u in m) || n * m[u] <= 0) exit 1
    printf "%.0f", n * m[u] }') || { echo "--link $link: not a rate like 1gbit or 200mbit" >&2; exit 2; }
fi

if [ -n "$settle_s" ] && ! [[ $settle_s =~ ^[0-9]+$ ]]; then
  echo "--settle $settle_s: not a whole number of seconds" >&2; exit 2
fi

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
# MOVER_BIN=PATH runs that mover binary instead of building this checkout's (to compare two
# builds on the same machine).
[ -n "${MOVER_BIN:-}" ] || (cd "$top" && cargo build --release -q -p mover-cli)
mover="${MOVER_BIN:-$top/target/release/mover}"

if [ -z "$dir" ]; then dir=$(mktemp -d /tmp/mover-bench-XXXXXX); fi
mkdir -p "$dir"
if [ -z "$settle_s" ]; then # ext4 keeps a journal's state under /proc/fs/jbd2/<device>-<n>
  settle_s=0
  read -r src fstype < <(findmnt -n -o SOURCE,FSTYPE --target "$dir" 2>/dev/null) || true
  if [ "${fstype:-}" = ext4 ] && ! compgen -G "/proc/fs/jbd2/${src##*/}-*" >/dev/null; then
    settle_s=365
  fi
fi
pids=()     # agents (first, in the order of nodes) and daemons: killed at exit, CPU counted
agents=()
daemons=()
rxs=()      # receiving pipelines in the background
nodes=(west1 east1 east2 east3 east4)
# on NODE CMD...: run a command on a host (in its namespace with --link).
on() { local n=$1; shift; if [ -n "$link" ]; then ip netns exec "mvb-$n" "$@"; else "$@"; fi; }
addr() { # host address of node index $1
  if [ -n "$link" ]; then echo "198.18.0.$(($1 + 1))"; else echo 127.0.0.1; fi
}
cleanup() {
  local p
  # A receiving pipeline left waiting (a scenario failed): its nc would never exit.
  for p in "${rxs[@]:-}"; do
    if [ -n "$p" ]; then pkill -P "$p" 2>/dev/null || true; fi
  done
  for p in "${pids[@]:-}" "${rxs[@]:-}"; do
    if [ -n "$p" ]; then kill "$p" 2>/dev/null || true; fi
  done
  wait 2>/dev/null || true
  if [ -n "$link" ]; then
    for n in "${nodes[@]}" sw; do ip netns del "mvb-$n" 2>/dev/null || true; done
  fi
  if [ "$keep" = 0 ]; then rm -rf "$dir"; else echo "kept $dir (earlier copies in $dir/trash)"; fi
}
trap cleanup EXIT

if [ -n "$link" ]; then
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
rm -rf "$dir/certs" # a kept --dir's: made afresh each run
"$mover" certs init --out "$dir/certs" --nodes "$(IFS=,; echo "${nodes[*]}")" >/dev/null
{
  printf '[tls]\nca = "certs/ca.pem"\ncert = "certs/controller.pem"\nkey = "certs/controller.key"\n'
  port=47100
  for i in "${!nodes[@]}"; do
    n=${nodes[$i]}
    port=$((port + 1))
    printf '[nodes.%s]\naddress = "%s:%s"\n' "$n" "$(addr "$i")" "$port"
    rm -rf "${dir:?}/$n/state"; mkdir -p "$dir/$n"
    printf 'node = "%s"\nlisten = "%s:%s"\nstate_dir = "%s/state"\n[tls]\nca = "certs/ca.pem"\ncert = "certs/%s.pem"\nkey = "certs/%s.key"\n[datasets.data]\npath = "%s/data"\n[datasets.small]\npath = "%s/small"\n' \
      "$n" "$(addr "$i")" "$port" "$n" "$n" "$n" "$n" "$n" > "$dir/$n.toml"
  done
} > "$dir/cluster.toml"

# Per tree (data: the main one, small: the small-file one): bytes, files, zstd -1 size.
declare -A tbytes tfiles tzbytes
describe() { # tree
  local t="$dir/west1/$1"
  tbytes[$1]=$(find "$t" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%d", s }')
  tfiles[$1]=$(find "$t" -type f | wc -l)
  tzbytes[$1]=$(tar -C "$t" -cf - . | zstd -1 -T1 -c | wc -c)
  echo "  ${tfiles[$1]} files, ${tbytes[$1]} bytes; zstd -1 of the tar stream: ${tzbytes[$1]} bytes ($(awk "BEGIN{printf \"%.2f\", ${tbytes[$1]}/${tzbytes[$1]}}")x)"
  # Warm the source's page cache for every contender alike (GNU tar reads nothing when its
  # output is /dev/null itself, hence the cat).
  tar -C "$t" -cf - . | cat > /dev/null
}
# made TREE PARAMS: is the tree in a kept --dir complete and made with these parameters? (A
# marker written after generation says so; anything else there is deleted and made again.)
made() {
  if [ "$(cat "$dir/west1/.$1.made" 2>/dev/null)" = "$2" ]; then
    echo "reusing $dir/west1/$1 (made with $2)"; return 0
  fi
  rm -rf "$dir/west1/$1" "$dir/west1/.$1.made"; return 1
}
if want_main; then
  if ! made data "--size $size --small-files $small"; then
    echo "generating a $size sample data directory ($small small files) in $dir/west1/data ..."
    "$mover" sample --out "$dir/west1/data" --size "$size" --small-files "$small" >/dev/null
    echo "--size $size --small-files $small" > "$dir/west1/.data.made"
  fi
  describe data
fi
if want '*-small'; then
  if ! made small "--small-only $small_only"; then
    echo "generating $small_only small files in $dir/west1/small ..."
    # The generator's small files (0-16 KiB of table pages), cut to 256 B - 4 KiB: the .frm,
    # .opt, .MYD and trigger files of a DB's many small tables. Its large files are empty here.
    "$mover" sample --out "$dir/west1/small" --size $((small_only * 8192)) --small-files "$small_only" >/dev/null
    find "$dir/west1/small" -type f -size +0 -print0 | sort -z |
      perl -0ne 'BEGIN { srand(42) } chomp; my $n = 256 + int(rand(3841)); my $s = -s $_;
        truncate($_, $n < $s ? $n : $s) or die "truncate $_: $!\n"'
    echo "--small-only $small_only" > "$dir/west1/.small.made"
  fi
  describe small
fi

for n in "${nodes[@]}"; do
  # Started directly (not through a shell function) so that $! is the agent, for its CPU
  # and VmHWM.
  if [ -n "$link" ]; then
    ip netns exec "mvb-$n" "$mover" agent --config "$dir/$n.toml" > "$dir/$n.log" 2>&1 &
  else
    "$mover" agent --config "$dir/$n.toml" > "$dir/$n.log" 2>&1 &
  fi
  pids+=($!)
  agents+=($!)
done
for n in "${nodes[@]}"; do
  for _ in $(seq 1 200); do grep -q "agent listening" "$dir/$n.log" && break; sleep 0.05; done
  grep -q "agent listening" "$dir/$n.log" || {
    echo "the $n agent did not start (a port of 47101..47105 taken?):" >&2
    cat "$dir/$n.log" >&2; exit 1; }
done

# The peers that need a server on east1: an rsync daemon and an sshd of our own (root login
# with a key made here, on ports of our own), started only when a scenario wants them.
start_servers() {
  local a; a=$(addr 1)
  local netns=()
  if [ -n "$link" ]; then netns=(ip netns exec mvb-east1); fi
  mkdir -p "$dir/east1/recv" "$dir/ssh"
  if want 'rsync-*'; then
    printf 'use chroot = false\n[recv]\npath = %s/east1/recv\nread only = false\nuid = root\ngid = root\n' \
      "$dir" > "$dir/rsyncd.conf"
    # Started directly (not through `on`) so that $! is the daemon itself, for cleanup and CPU.
    "${netns[@]}" rsync --daemon --no-detach --address "$a" --port 47301 \
      --config "$dir/rsyncd.conf" --log-file "$dir/rsyncd.log" > /dev/null 2>&1 &
    pids+=($!)
    daemons+=($!)
  fi
  if want scp-1to1 || want sshtar-1to1; then
    [ "$(id -u)" = 0 ] || { echo "scp-1to1 and sshtar-1to1 need root (an sshd of our own)" >&2; exit 1; }
    ssh-keygen -q -t ed25519 -N '' -f "$dir/ssh/host" <<< y >/dev/null
    ssh-keygen -q -t ed25519 -N '' -f "$dir/ssh/client" <<< y >/dev/null
    cp "$dir/ssh/client.pub" "$dir/ssh/authorized_keys"
    mkdir -p /run/sshd
    "${netns[@]}" /usr/sbin/sshd -D -e -p 47302 -o ListenAddress="$a" -h "$dir/ssh/host" \
      -o AuthorizedKeysFile="$dir/ssh/authorized_keys" -o PermitRootLogin=prohibit-password \
      -o StrictModes=no -o PidFile=none > /dev/null 2> "$dir/sshd.log" &
    pids+=($!)
    daemons+=($!)
  fi
  sleep 0.5
}
ssh_opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR)

# Measuring: /proc is read with builtins, so that measuring adds next to no CPU of its own.
hz=$(getconf CLK_TCK)
cpu_ticks() { # sets cpu: CPU ticks so far of this script's reaped children, agents and daemons
  local line p f
  read -r line < "/proc/$$/stat"
  read -ra f <<< "${line##*) }"
  cpu=$((f[13] + f[14]))  # cutime + cstime (fields 16 and 17)
  for p in "${pids[@]}"; do
    read -r line < "/proc/$p/stat" || continue
    read -ra f <<< "${line##*) }"
    cpu=$((cpu + f[11] + f[12] + f[13] + f[14]))  # utime + stime + cutime + cstime
  done
}
daemons_idle() { # waits (at most 5 s) until the daemons have reaped their per-connection children
  local p c i
  for p in "${daemons[@]:-}"; do
    [ -n "$p" ] || continue
    for ((i = 0; i < 50; i++)); do
      c=""
      read -r c < "/proc/$p/task/$p/children" || true
      [ -z "$c" ] && break
      sleep 0.1
    done
  done
}
hwm_reset=1
reset_peaks() { # VmHWM back to the current RSS (Linux >= 4.0), so each scenario has its own peak
  local p
  for p in "${agents[@]}"; do { echo 5 > "/proc/$p/clear_refs"; } 2>/dev/null || hwm_reset=0; done
}
peaks() { # prints each agent's VmHWM in MiB
  local p k v out=""
  for p in "${agents[@]}"; do
    while read -r k v _; do
      if [ "$k" = VmHWM: ]; then out+=" $((v / 1024))"; break; fi
    done < "/proc/$p/status"
  done
  echo "$out"
}
listening() { # node-index port: waits (at most 5 s) until a TCP listener is up on that host
  local table=/proc/self/net/tcp hex _ a _ st _ i
  if [ -n "$link" ]; then table="/proc/${agents[$1]}/net/tcp"; fi
  printf -v hex ':%04X' "$2"
  for ((i = 0; i < 500; i++)); do
    while read -r _ a _ st _; do
      if [[ $a == *"$hex" && $st == 0A ]]; then return 0; fi
    done < "$table"
    sleep 0.01
  done
  echo "no listener on port $2 of ${nodes[$1]}" >&2; return 1
}

trash="$dir/trash" trash_n=0 trash_kb=0 # copies moved aside (a kept --dir's from earlier runs too)
if [ -d "$trash" ]; then trash_kb=$(du -sk "$trash"); trash_kb=${trash_kb%%[[:space:]]*}; fi
# A quarter of the space free once the copies moved aside are gone (worked out again after
# each bulk delete: a run that found a large trash would otherwise delete every few scenarios).
trash_max() { echo $((($(df --output=avail -k "$dir" | tail -1) + trash_kb) / 4)); }
trash_max_kb=$(trash_max)
# After a bulk delete and its wait, one untimed copy of the main tree (and the source's trees
# read once more): the first files made after a large delete came slower than any later ones
# (mover 2.63 s, then 1.98 and 1.90, on loopback), and without this whichever scenario came
# first paid for it.
warm_up() {
  local t
  for t in "$dir"/west1/data "$dir"/west1/small; do
    if [ -d "$t" ]; then tar -C "$t" -cf - . | cat > /dev/null; fi
  done
  want_main && [ -d "$dir/west1/data" ] || return 0
  cp -a "$dir/west1/data" "$dir/east1/warm-up"
  sync
  to_trash "$dir/east1/warm-up"
}
to_trash() { # DIR: moved aside and counted, to be deleted in bulk later
  local kb
  kb=$(du -sk "$1"); kb=${kb%%[[:space:]]*}
  mkdir -p "$trash"; trash_n=$((trash_n + 1)); mv "$1" "$trash/$$-$trash_n"
  trash_kb=$((trash_kb + kb))
}
clear_targets() {
  local n d
  for n in "${nodes[@]:1}"; do
    for d in "$dir/$n/data" "$dir/$n/small" "$dir/$n/recv"; do
      [ -e "$d" ] || continue
      if [ "$settle_s" = 0 ]; then rm -rf "$d"; else to_trash "$d"; fi
    done
  done
  if [ "$trash_kb" -gt "$trash_max_kb" ]; then
    echo "  (deleting $((trash_kb / 1024)) MiB of earlier copies, then ${settle_s} s for ext4 to let their inodes go)"
    rm -rf "$trash"; trash_kb=0
    sync
    trash_max_kb=$(trash_max)
    sleep "$settle_s"
    warm_up
  fi
  sync
}
results=()   # "name seconds cpu-ticks tree"
rss=()       # "name MiB-per-agent..." for mover scenarios
begin() {
  clear_targets
  reset_peaks
  cpu_ticks; cpu0=$cpu
  t0=$EPOCHREALTIME
}
finish() { # name tree [note]: the scenario is over once a sync returns
  local t1 secs
  sync
  t1=$EPOCHREALTIME
  daemons_idle
  cpu_ticks
  secs=$(awk "BEGIN{print $t1 - $t0}")
  results+=("$1 $secs $((cpu - cpu0)) $2")
  if [[ $1 == mover-* ]]; then rss+=("$1$(peaks)"); fi
  printf '  %-16s %8.2f s %8.2f CPU s%s\n' "$1" "$secs" "$(awk "BEGIN{print $((cpu - cpu0)) / $hz}")" "${3:-}"
}

run_mover() { # name topology targets tree [extra flags]
  local out wire=""
  begin
  out=$(on west1 "$mover" send --cluster "$dir/cluster.toml" --from "west1:$4" --to "$3" \
    --topology "$2" --json "${@:5}") || { echo "$out" >&2; echo "mover send failed" >&2; exit 1; }
  if [[ $out =~ \"wire_bytes\":\ *([0-9]+) ]]; then
    wire="  (source sent $((BASH_REMATCH[1] / 1000000)) MB per first hop)"
  fi
  finish "$1" "$4" "$wire"
}

pipe_copy() { # compress(0/1) target-index port tree
  local tdir="$dir/east$2/recv" a
  a=$(addr "$2")
  mkdir -p "$tdir"
  if [ "$1" = 1 ]; then
    (on "east$2" nc -l "$a" "$3" | zstd -d -q | tar -C "$tdir" -xf -) &
  else
    (on "east$2" nc -l "$a" "$3" | tar -C "$tdir" -xf -) &
  fi
  local rx=$!
  rxs+=("$rx")
  listening "$2" "$3"
  if [ "$1" = 1 ]; then
    tar -C "$dir/west1/$4" -cf - . | zstd -1 -T1 -q -c | on west1 nc -N "$a" "$3"
  else
    tar -C "$dir/west1/$4" -cf - . | on west1 nc -N "$a" "$3"
  fi
  wait "$rx"
  unset 'rxs[-1]'
}

run_pipe() { # name compress targets tree: one copy after the other
  local i
  begin
  for ((i = 1; i <= $3; i++)); do pipe_copy "$2" "$i" $((47200 + i)) "$4"; done
  finish "$1" "$4"
}

run_peer() { # name tree: one copy to east1 by a tool users use today
  local a; a=$(addr 1)
  begin
  mkdir -p "$dir/east1/recv"
  case "$1" in
    sshtar-1to1)
      tar -C "$dir/west1/$2" -cf - . | on west1 ssh "${ssh_opts[@]}" -i "$dir/ssh/client" \
        -p 47302 "root@$a" "tar -C '$dir/east1/recv' -xf -" ;;
    rsync-*)
      on west1 rsync -a "$dir/west1/$2/" "rsync://$a:47301/recv/" ;;
    scp-1to1)
      on west1 scp -q -r "${ssh_opts[@]}" -i "$dir/ssh/client" -P 47302 \
        "$dir/west1/$2/." "root@$a:$dir/east1/recv/" ;;
    cp-local)
      cp -a "$dir/west1/$2/." "$dir/east1/recv/" ;;
  esac
  finish "$1" "$2"
}

targets() { # N: east1,...,eastN
  local i out=east1
  for ((i = 2; i <= $1; i++)); do out+=",east$i"; done
  echo "$out"
}

start_servers
# Without a settle time every scenario but the first starts right after the previous one's
# copies were deleted (see above); so that the first one starts the same way, make and delete
# as many (empty) files on the targets first.
prime_targets() {
  local n
  if want_main; then
    for n in "${nodes[@]:1}"; do cp -r --attributes-only "$dir/west1/data" "$dir/$n/data"; done
  fi
  if want '*-small'; then cp -r --attributes-only "$dir/west1/small" "$dir/east1/small"; fi
  clear_targets
}
if [ "$settle_s" = 0 ]; then prime_targets; fi
if [ -n "$link" ]; then where="network namespaces, $link uplinks"; else where=loopback; fi
if [ "$settle_s" = 0 ]; then how="each delete right away"; else how="copies deleted in bulk"; fi
echo "running ($where, $(nproc) cores, $how):"
for s in "${wanted[@]}"; do
  case "$s" in
    mover-1to1) run_mover "$s" chain east1 data ;;
    mover-raw-1to1) run_mover "$s" chain east1 data --compress off ;;
    mover-chain[1-4]) run_mover "$s" chain "$(targets "${s: -1}")" data ;;
    mover-star[1-4]) run_mover "$s" star "$(targets "${s: -1}")" data ;;
    mover-raw-chain[1-4]) run_mover "$s" chain "$(targets "${s: -1}")" data --compress off ;;
    mover-small) run_mover "$s" chain east1 small ;;
    tarzstd-1to1) run_pipe "$s" 1 1 data ;;
    tar-1to1) run_pipe "$s" 0 1 data ;;
    serial[1-4]) run_pipe "$s" 1 "${s: -1}" data ;;
    tarzstd-small) run_pipe "$s" 1 1 small ;;
    tar-small) run_pipe "$s" 0 1 small ;;
    sshtar-1to1|rsync-1to1|scp-1to1|cp-local) run_peer "$s" data ;;
    rsync-small) run_peer "$s" small ;;
  esac
done

# Shape: what a scenario is compared with: the same tree to the same number of targets.
shape() {
  case "$1" in
    cp-local) echo "" ;;
    *-small) echo small ;;
    mover-chain*|mover-star*|mover-raw-chain*|serial*) echo "${1: -1}" ;;
    *) echo 1 ;;
  esac
}
declare -A best_s best_n secs_of
for r in "${results[@]}"; do
  read -r name secs _ _ <<< "$r"
  secs_of[$name]=$secs
  sh=$(shape "$name")
  if [ -n "$sh" ] && [[ $name != mover-* ]] &&
    { [ -z "${best_s[$sh]:-}" ] || awk "BEGIN{exit !($secs < ${best_s[$sh]})}"; }; then
    best_s[$sh]=$secs; best_n[$sh]=$name
  fi
done

echo
printf '%-16s %8s %8s %9s %9s %8s %9s\n' SCENARIO SECONDS MB/S "CPU S/GB" FILES/S "VS PEER" "VS LIMIT"
for r in "${results[@]}"; do
  read -r name secs ticks tree <<< "$r"
  sh=$(shape "$name")
  files=-; peer=-; limit=-
  if [ "$tree" = small ]; then files=$(awk "BEGIN{printf \"%.0f\", ${tfiles[$tree]} / $secs}"); fi
  if [ -n "$sh" ] && [ -n "${best_s[$sh]:-}" ]; then
    peer=$(awk "BEGIN{printf \"%.2fx\", $secs / ${best_s[$sh]}}")
  fi
  if [ -n "$link" ] && [ "$name" != cp-local ]; then
    limit=$(awk "BEGIN{printf \"%.2fx\", $secs / (${tzbytes[$tree]} * 8 / $link_bps)}")
  fi
  printf '%-16s %8.2f %8.1f %9.2f %9s %8s %9s\n' "$name" "$secs" \
    "$(awk "BEGIN{print ${tbytes[$tree]} / 1e6 / $secs}")" \
    "$(awk "BEGIN{print $ticks / $hz / (${tbytes[$tree]} / 1e9)}")" "$files" "$peer" "$limit"
done
echo "best peer (fastest non-mover scenario of the same tree and number of targets):"
for sh in 1 2 3 4 small; do
  if [ -n "${best_n[$sh]:-}" ]; then
    case "$sh" in small) what="small tree" ;; 1) what="1 target" ;; *) what="$sh targets" ;; esac
    printf '  %-12s %s\n' "$what" "${best_n[$sh]}"
  fi
done
if [ -n "$link" ]; then
  for tree in data small; do
    if [ -n "${tzbytes[$tree]:-}" ]; then
      echo "limit ($tree tree): ${tzbytes[$tree]} bytes after zstd -1 at $link = $(awk "BEGIN{printf \"%.2f\", ${tzbytes[$tree]} * 8 / $link_bps}") s (TCP/IP, TLS and QUIC headers add a few % more)"
    fi
  done
fi

fan=""
for kind in mover-chain mover-star serial; do
  [ -n "${secs_of[${kind}1]:-}" ] || continue
  line=$(printf '  %-12s' "$kind")
  for n in 1 2 3 4; do
    if [ -n "${secs_of[$kind$n]:-}" ]; then
      line+=$(awk "BEGIN{printf \" %7.2fx\", ${secs_of[$kind$n]} / ${secs_of[${kind}1]}}")
    else
      line+=$(printf ' %8s' -)
    fi
  done
  fan+="$line"$'\n'
done
if [ -n "$fan" ]; then
  echo
  echo "fan-out: seconds to N targets over the same tool's seconds to 1"
  printf '  %-12s %8s %8s %8s %8s\n' "" N=1 N=2 N=3 N=4
  printf '%s' "$fan"
  if [ -n "${secs_of[mover-chain4]:-}" ]; then
    r=$(awk "BEGIN{printf \"%.2f\", ${secs_of[mover-chain4]} / ${secs_of[mover-chain1]}}")
    if awk "BEGIN{exit !($r <= 1.15)}"; then verdict="within"; else verdict="NOT within"; fi
    echo "  mover chain 1->4 vs 1->1: ${r}x ($verdict the 1.15x goal)"
  fi
fi

if [ "${#rss[@]}" -gt 0 ]; then
  echo
  if [ "$hwm_reset" = 1 ]; then
    echo "peak RSS per agent, MiB (VmHWM, reset before each scenario):"
  else
    echo "peak RSS per agent, MiB (VmHWM since the agents started: this kernel cannot reset it):"
  fi
  printf '  %-16s' SCENARIO; printf ' %6s' "${nodes[@]}"; echo
  for r in "${rss[@]}"; do
    read -ra f <<< "$r"
    printf '  %-16s' "${f[0]}"; printf ' %6s' "${f[@]:1}"; echo
  done
fi
