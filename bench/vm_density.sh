#!/usr/bin/env bash
# Host memory per idle VM: N Debian VMs launched by the vessel daemon (`launch --vm
# --image debian/bookworm`, the software vCPU) against N QEMU TCG microvms booting the
# same kernel, initramfs and Debian disk (a qcow2 overlay each over the image's ext4
# disk), all with the same guest memory, in one run. A VM counts once it has booted to
# its login prompt and idled 20 s. Each VM's cost is the proportional set size (PSS) of
# its processes on the host (vessel: the supervisor and the VMM; QEMU: qemu), and the
# part of it beyond the guest's touched pages (PSS minus the resident pages of the
# guest-RAM mapping). Prints the medians, the ratio, and how many such idle VMs this
# host's memory would hold.
#
#   bench/vm_density.sh [N] [MEMORY_MIB]   (default 3 VMs of 96 MiB; needs root,
#                                          mmdebstrap, mkfs.ext4, qemu-system-x86_64)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
qemu_tsc=$(qemu_tsc_khz)
n=${1:-3}
mem=${2:-96}
[ "$(id -u)" = 0 ] || { echo "bench/vm_density.sh: needs root" >&2; exit 1; }
for tool in qemu-system-x86_64 qemu-img mmdebstrap mkfs.ext4 python3; do
  command -v "$tool" >/dev/null || { echo "bench/vm_density.sh: needs $tool" >&2; exit 1; }
done
vessel=${VESSEL:-target/release/vessel}
[ -x "$vessel" ] || cargo build --release -p vessel
vessel=$(realpath "$vessel")
"$vessel" guest fetch >/dev/null
guest_json=$("$vessel" guest info --json)
kernel=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["kernel"])' "$guest_json")
initrd=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["initrd"])' "$guest_json")

work=$(mktemp -d /var/tmp/vessel-vm-density.XXXXXX)
export VESSEL_SOCKET=$work/vessel.sock
qemu_pids=()
cleanup() {
  for i in $(seq "$n"); do "$vessel" rm --force "vm$i" >/dev/null 2>&1 || true; done
  for pid in "${qemu_pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  stop_daemons
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

NO_CONTAINERD=1 start_daemons "$work"
echo "building the debian/bookworm image (mmdebstrap) ..." >&2
"$vessel" image build debian/bookworm >/dev/null

# PSS in KiB of the given pids, and the resident KiB of each one's guest-RAM mapping (the
# private anonymous mapping of at least the guest's memory size).
measure() {
  python3 - "$mem" "$@" <<'EOF'
import sys
mem_kib = int(sys.argv[1]) * 1024
pss = guest = 0
for pid in set(sys.argv[2:]):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                pss += int(line.split()[1])
        size = rss = 0
        best = 0
        for line in open(f"/proc/{pid}/smaps"):
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size = (hi - lo) // 1024
                anon = len(parts) == 5 and "rw" in parts[1]
            elif parts[0] == "Rss:" and anon and size >= mem_kib:
                best = max(best, int(parts[1]))
        guest += best
    except OSError:
        pass
print(pss, guest)
EOF
}
wait_login() {  # wait_login FILE: until the console shows a login prompt (at most 600 s)
  for _ in $(seq 1200); do grep -q "login:" "$1" 2>/dev/null && return 0; sleep 0.5; done
  echo "bench/vm_density.sh: $1 never showed a login prompt" >&2; exit 1
}

# vessel: N VMs through the daemon.
for i in $(seq "$n"); do
  "$vessel" launch "vm$i" --vm --image debian/bookworm --memory "${mem}M" >/dev/null
done
for i in $(seq "$n"); do wait_login "$work/state/instances/vm$i/console.log"; done
sleep 20
vessel_rows=()
for i in $(seq "$n"); do
  vmm=$("$vessel" info "vm$i" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
  sup=$(awk '{print $4}' /proc/"$vmm"/stat)
  vessel_rows+=("$(measure "$vmm" "$sup")")
done
for i in $(seq "$n"); do "$vessel" stop --force "vm$i" >/dev/null; done

# QEMU: the same guest on microvm (ACPI describes its virtio-mmio devices as vessel's do).
base=$(ls "$work"/state/images/debian-bookworm/disk-*.ext4 | head -1)
for i in $(seq "$n"); do
  qemu-img create -q -f qcow2 -F raw -b "$base" "$work/qemu$i.qcow2"
  qemu-system-x86_64 -M microvm,acpi=on -accel tcg -cpu max -m "$mem" -smp 1 -nodefaults \
    -no-user-config -display none -serial "file:$work/qemu$i.log" \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 $qemu_tsc root=/dev/vda rw" \
    -drive "if=none,id=root,file=$work/qemu$i.qcow2,format=qcow2" \
    -device virtio-blk-device,drive=root &
  qemu_pids+=($!)
done
for i in $(seq "$n"); do wait_login "$work/qemu$i.log"; done
sleep 20
qemu_rows=()
for pid in "${qemu_pids[@]}"; do qemu_rows+=("$(measure "$pid")"); done

python3 - "$n" "$mem" "${vessel_rows[@]}" -- "${qemu_rows[@]}" <<'EOF'
import statistics, sys
n, mem = int(sys.argv[1]), int(sys.argv[2])
rest = sys.argv[3:]
cut = rest.index("--")
parse = lambda rows: [tuple(int(x) for x in r.split()) for r in rows]
vessel, qemu = parse(rest[:cut]), parse(rest[cut + 1:])
host_kib = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal:")))
def row(name, rows):
    pss = statistics.median(r[0] for r in rows) / 1024
    beyond = statistics.median(r[0] - r[1] for r in rows) / 1024
    print(f"{name:7} PSS per idle VM {pss:7.1f} MiB, beyond the guest's touched pages "
          f"{beyond:6.1f} MiB; this host holds about {int(host_kib / 1024 / pss)}")
    return pss, beyond
print(f"{n} idle Debian VMs of {mem} MiB each (medians)")
v = row("vessel", vessel)
q = row("qemu", qemu)
print(f"ratio (qemu / vessel): PSS {q[0] / v[0]:.2f}, beyond the guest {q[1] / v[1]:.2f}")
EOF
