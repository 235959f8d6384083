#!/usr/bin/env bash
# One busy instance cannot starve the others: two CPU-bound containers (no CPU limit,
# `while :; do :; done`) and a third that measures its own scheduling latency: a shell
# that sleeps 10 ms 300 times, then reads its own /proc/self/schedstat (time spent
# runnable but waiting for a CPU, and how many times it ran). Its mean wait per wake-up,
# alone and beside the two busy ones, under the vessel daemon and under containerd
# (`ctr run`, runc), on the same busybox root, in one run.
#
#   bench/fairness.sh          (needs root and containerd)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
containers_bench_setup fairness.sh
names="hog1 hog2 probe"
cleanup() {
  # shellcheck disable=SC2086
  remove_instances $names
  stop_daemons
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start_daemons "$work"

hog='while :; do :; done'
# Prints "wait_ns timeslices" of the probing shell after its 300 sleeps.
probe='i=0; while [ $i -lt 300 ]; do usleep 10000; i=$((i+1)); done; read run wait slices < /proc/self/schedstat; echo "$wait $slices"'

# vessel: the probe alone, then beside two busy containers.
for name in $names; do "$vessel" launch "$name" >/dev/null; done
v_alone=$("$vessel" exec probe -- sh -c "$probe")
"$vessel" exec hog1 -- sh -c "$hog" 2>/dev/null &
hog1=$!
"$vessel" exec hog2 -- sh -c "$hog" 2>/dev/null &
hog2=$!
sleep 2
v_busy=$("$vessel" exec probe -- sh -c "$probe")
for name in $names; do "$vessel" rm --force "$name" >/dev/null; done
wait "$hog1" "$hog2" 2>/dev/null || true

# containerd (runc): the same.
c_alone=$(ctr run --rm --rootfs "$root" probe /bin/sh -c "$probe")
ctr run -d --rootfs "$root" hog1 /bin/sh -c "$hog" >/dev/null
ctr run -d --rootfs "$root" hog2 /bin/sh -c "$hog" >/dev/null
sleep 2
c_busy=$(ctr run --rm --rootfs "$root" probe /bin/sh -c "$probe")

python3 - "$v_alone" "$v_busy" "$c_alone" "$c_busy" <<'EOF'
import sys
def mean_ms(text):
    wait, slices = (int(x) for x in text.split())
    return wait / max(slices, 1) / 1e6
va, vb, ca, cb = (mean_ms(t) for t in sys.argv[1:])
print("probe's mean wait for a CPU per wake-up (ms)   vessel  containerd  ratio")
print(f"alone                                         {va:7.3f}  {ca:10.3f}  {va / ca if ca else float('nan'):5.2f}")
print(f"beside two CPU-bound containers               {vb:7.3f}  {cb:10.3f}  {vb / cb if cb else float('nan'):5.2f}")
print("ratio = vessel / containerd (lower is better)")
EOF
