#!/usr/bin/env bash
# Host memory per idle container: N containers launched by the vessel daemon against N
# started by containerd (`ctr run --rootfs`, one containerd-shim-runc-v2 each), both on the
# same busybox root and idle in `sleep`, in one run. Each container's cost is the
# proportional set size (PSS) of every process it takes on the host: vessel's supervisor
# and the container's processes; containerd's shim and the container's processes. The
# daemons themselves are shared and not counted. Prints the medians per container, and
# MemAvailable's drop per container as a second figure.
#
#   bench/density.sh [N]      (default 20; needs root and containerd)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
n=${1:-20}
containers_bench_setup density.sh
cleanup() {
  # shellcheck disable=SC2046
  remove_instances $(seq -f "idle%g" "$n")
  stop_daemons
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

start_daemons "$work"

# PSS in KiB of the given pids, each counted once.
pss_kib() {
  python3 - "$@" <<'EOF'
import sys
total = 0
for pid in set(sys.argv[1:]):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    except OSError:
        pass
print(total)
EOF
}
mem_available_kib() { awk '/^MemAvailable:/ {print $2}' /proc/meminfo; }
# A process and all its descendants.
tree() {
  local pid=$1
  echo "$pid"
  for child in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do tree "$child"; done
}

sync; echo 3 >/proc/sys/vm/drop_caches
before=$(mem_available_kib)
for i in $(seq "$n"); do "$vessel" launch "idle$i" >/dev/null; done
sleep 2
after=$(mem_available_kib)
v_avail=$(( (before - after) / n ))
v_each=()
for sup in $(pgrep -f "vessel supervise $work/state/instances/idle"); do
  # shellcheck disable=SC2046
  v_each+=("$(pss_kib $(tree "$sup"))")
done
[ "${#v_each[@]}" = "$n" ] || { echo "bench/density.sh: $n vessel containers expected, ${#v_each[@]} supervisors found" >&2; exit 1; }
for i in $(seq "$n"); do "$vessel" rm --force "idle$i" >/dev/null; done

sync; echo 3 >/proc/sys/vm/drop_caches
before=$(mem_available_kib)
for i in $(seq "$n"); do
  ctr run -d --rootfs "$root" "idle$i" /bin/sleep 1000000 >/dev/null
done
sleep 2
after=$(mem_available_kib)
c_avail=$(( (before - after) / n ))
c_each=()
for shim in $(pgrep -f "containerd-shim-runc-v2 -namespace vessel-bench"); do
  # shellcheck disable=SC2046
  c_each+=("$(pss_kib $(tree "$shim"))")
done
# One shim per container (containerd's default groups none).
[ "${#c_each[@]}" = "$n" ] || { echo "bench/density.sh: $n containerd shims expected, ${#c_each[@]} found" >&2; exit 1; }

median() { python3 -c 'import statistics, sys; print(statistics.median(int(x) for x in sys.argv[1:]))' "$@"; }
v=$(median "${v_each[@]}"); c=$(median "${c_each[@]}")
printf '%-44s %12s %12s %7s\n' "idle containers: $n each" "vessel" "containerd" "ratio"
printf '%-44s %9.2f MiB %9.2f MiB %7.2f\n' "PSS per container (median)" "$(echo "$v/1024" | bc -l)" "$(echo "$c/1024" | bc -l)" "$(echo "$v/$c" | bc -l)"
printf '%-44s %9.2f MiB %9.2f MiB %7.2f\n' "MemAvailable drop per container" "$(echo "$v_avail/1024" | bc -l)" "$(echo "$c_avail/1024" | bc -l)" "$(echo "$v_avail/$c_avail" | bc -l)"
echo "ratio = vessel / containerd (lower is better; goal: under 2 MiB per idle container)"
