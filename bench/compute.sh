#!/usr/bin/env bash
# Times compute workloads inside the default guest on vessel's software vCPU and on QEMU's
# TCG (same kernel, initramfs, memory and one vCPU), and the same busybox binary natively
# on the host; prints the three figures and both ratios per workload.
#
#   bench/compute.sh [RUNS]     (default 3; needs qemu-system-x86 and the default guest)
#
# Each workload is timed inside its machine, from /proc/uptime (10 ms steps) before and
# after, so boot time does not count. The guest's busybox is taken out of the initramfs and
# run natively on the host too, with its applets first in PATH. Inputs are made before the
# timer starts, by the same busybox, so all three compute on the same bytes; each workload
# prints a digest of its output, and a digest that differs between vessel, QEMU or the
# host fails the script. Runs alternate between vessel, QEMU and the host, and the figures
# are medians.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
# shellcheck source=bench/lib.sh
. bench/lib.sh
command -v qemu-system-x86_64 >/dev/null || { echo "bench/compute.sh: needs qemu-system-x86_64 (apt-get install qemu-system-x86)" >&2; exit 1; }

default_guest
memory=512
base="console=ttyS0 panic=-1 quiet tsc=reliable"
# The host's TSC frequency (see bench/lib.sh): QEMU's guest clock times the workloads.
qemu_extra=$(qemu_tsc_khz)

work=$(mktemp -d /tmp/vessel-compute-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

# The guest's own busybox, for the native runs: the initramfs is an uncompressed newc cpio.
python3 - "$initrd" "$work/busybox" <<'EOF'
import sys
data = open(sys.argv[1], "rb").read()
at = 0
while at + 110 <= len(data):
    assert data[at:at + 6] == b"070701", "not a newc cpio archive"
    field = lambda n: int(data[at + 6 + 8 * n: at + 14 + 8 * n], 16)
    size, namesize = field(6), field(11)
    name_end = at + 110 + namesize
    name = data[at + 110:name_end - 1].decode()
    start = (name_end + 3) & ~3
    if name == "bin/busybox":
        open(sys.argv[2], "wb").write(data[start:start + size])
        break
    at = (start + size + 3) & ~3
else:
    sys.exit("bin/busybox not found in the initramfs")
EOF
chmod +x "$work/busybox"
mkdir "$work/bin"
"$work/busybox" --install -s "$work/bin"

# Each workload: NAME, setup (untimed), the timed command, whose output is digested. The
# script stays short: QEMU gets it on the kernel command line (2048 bytes at most).
script='cd /tmp
t(){ a=$(cut -d" " -f1 /proc/uptime); r=$(eval "$2"|md5sum|cut -c1-8); b=$(cut -d" " -f1 /proc/uptime); echo "W $1 $a $b $r"; }
t md5sum "dd if=/dev/zero bs=1M count=64 2>/dev/null|md5sum"
t sha256sum "dd if=/dev/zero bs=1M count=32 2>/dev/null|sha256sum"
seq 1 1900000 >f
t gzip "gzip -6 -c f >f.gz; gunzip -c f.gz|md5sum; wc -c <f.gz"
rm -f f f.gz
t awk "awk '"'"'BEGIN{s=0;for(i=0;i<1000000;i++)s=(s+i*i)%1000003;print s}'"'"'"
awk '"'"'BEGIN{srand(1);for(i=0;i<200000;i++)print int(rand()*1e9)}'"'"' >n
t sort "sort -n n"
rm -f n
T=$(which true)
t fork "i=0; while [ \$i -lt 500 ]; do \$T; i=\$((i+1)); done; echo \$i"'
# argv ["sh", "-c", SCRIPT] as the guest's /init reads vessel.cmd=: base64 words, commas.
qemu_cmd="vessel.cmd=$(printf sh | base64 -w0),$(printf %s -c | base64 -w0),$(printf %s "$script" | base64 -w0)"
[ $(( ${#base} + ${#qemu_extra} + ${#qemu_cmd} + 2 )) -lt 2048 ] || { echo "bench/compute.sh: the script is too long for a kernel command line" >&2; exit 1; }

out="$work/out"
# results/MACHINE/NAME holds one line per run: seconds and output digest.
mkdir -p "$work/results"/{vessel,qemu,host}
collect() {
  local machine=$1
  [ "$(grep -c '^W ' "$out")" = 6 ] || {
    echo "bench/compute.sh: the $machine run did not print all six workloads:" >&2
    tail -n 20 "$out" >&2
    exit 1
  }
  # Serial consoles end lines with CR LF.
  grep '^W ' "$out" | tr -d '\r' | while read -r _ name a b digest; do
    awk -v a="$a" -v b="$b" -v d="$digest" 'BEGIN { printf "%.2f %s\n", b - a, d }' >>"$work/results/$machine/$name"
  done
}

for i in $(seq "$runs"); do
  set +e
  timeout 900 "$vessel" run --accel emu --cpus 1 --memory "${memory}M" --kernel "$kernel" \
      --initrd "$initrd" --cmdline "$base" -- sh -c "$script" >"$out" 2>&1 </dev/null
  status=$?
  set -e
  [ "$status" = 0 ] || { echo "bench/compute.sh: vessel run $i exited $status:" >&2; tail -n 5 "$out" >&2; exit 1; }
  collect vessel

  # A QEMU boot that hangs anyway (no workload line within 60 s) is retried, twice at most.
  for attempt in 1 2 3; do
    set +e
    timeout 900 qemu-system-x86_64 -accel tcg -M microvm -cpu qemu64 -m "$memory" -nographic \
        -no-reboot -kernel "$kernel" -initrd "$initrd" -append "$base $qemu_extra $qemu_cmd" \
        >"$out" 2>&1 </dev/null &
    qemu=$!
    set -e
    for _ in $(seq 60); do grep -q '^W ' "$out" && break; sleep 1; done
    if grep -q '^W ' "$out"; then wait "$qemu"; status=$?; break; fi
    kill "$qemu" 2>/dev/null; wait "$qemu" 2>/dev/null || true; status=hung
  done
  [ "$status" = 0 ] || { echo "bench/compute.sh: QEMU run $i ended with $status:" >&2; tail -n 5 "$out" >&2; exit 1; }
  collect qemu

  (cd "$work" && mkdir -p tmp && PATH="$work/bin" "$work/busybox" sh -c "${script/cd \/tmp/cd $work/tmp}") >"$out" 2>&1
  collect host
done

printf '%-10s %10s %10s %10s %12s %12s\n' workload vessel qemu host vessel/qemu vessel/host
for name in md5sum sha256sum gzip awk sort fork; do
  python3 - "$work/results" "$name" <<'EOF'
import statistics, sys
root, name = sys.argv[1], sys.argv[2]
figures, digests = {}, {}
for machine in ("vessel", "qemu", "host"):
    rows = [line.split() for line in open(f"{root}/{machine}/{name}")]
    figures[machine] = statistics.median(float(r[0]) for r in rows)
    digests[machine] = {r[1] for r in rows}
if len(set().union(*digests.values())) != 1:
    sys.exit(f"bench/compute.sh: {name} computed different outputs: {digests}")
v, q, h = figures["vessel"], figures["qemu"], figures["host"]
ratio = lambda a, b: f"{a / b:.2f}" if b > 0 else "-"
print(f"{name:<10} {v:9.2f}s {q:9.2f}s {h:9.2f}s {ratio(v, q):>12} {ratio(v, h):>12}")
EOF
done
echo "medians of $runs interleaved runs; timed inside each machine from /proc/uptime (10 ms steps)"
echo "targets: vessel/qemu <= 1.00 each; goal vessel/host <= 4 for md5sum, sha256sum, gzip, sort"
