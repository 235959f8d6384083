#!/usr/bin/env bash
# virtio-blk throughput of the same guest on vessel's software vCPU and on QEMU's TCG, in
# one run: O_DIRECT sequential write and read of 256 MiB, then 4 KiB random reads, timed
# inside the guest by bench/tools/iobench.rs (built static here). Both VMMs get the same
# kernel and initramfs (the default guest), 512 MiB, one vCPU, and the same two raw
# images: a small ext4 disk holding iobench (read-only) and the 300 MiB disk under test,
# each on a virtio-mmio disk with the host's page cache (QEMU's default, vessel's way).
# Runs alternate between the two; the figures are medians; a run that does not print its
# result line fails the script.
#
#   bench/disk.sh [RUNS]     (default 3; needs qemu-system-x86, e2fsprogs, rustc)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
# shellcheck source=bench/lib.sh
. bench/lib.sh
qemu_tsc=$(qemu_tsc_khz)
for tool in qemu-system-x86_64 mkfs.ext4 rustc python3; do
  command -v "$tool" >/dev/null || { echo "bench/disk.sh: needs $tool" >&2; exit 1; }
done
default_guest

work=$(mktemp -d /tmp/vessel-disk-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/tools"
rustc -O -C target-feature=+crt-static -C strip=symbols bench/tools/iobench.rs -o "$work/tools/iobench"
mkfs.ext4 -q -d "$work/tools" "$work/tools.img" 16M
truncate -s 300M "$work/disk.raw"

# The guest finds the tools disk by its size (the two VMMs may order the disks
# differently), then benchmarks the other one.
script='for d in vda vdb; do if [ $(cat /sys/block/$d/size) -lt 100000 ]; then t=$d; else b=$d; fi; done
mount -o ro /dev/$t /mnt && /mnt/iobench /dev/$b 256 2000'
b64() { printf %s "$1" | base64 -w0; }
cmd="vessel.cmd=$(b64 sh),$(b64 -c),$(b64 "$script")"
base="console=ttyS0 panic=-1 quiet tsc=reliable"
out=$(mktemp /tmp/vessel-disk-bench-out.XXXXXX)
trap 'rm -rf "$work" "$out"' EXIT

result() {  # the iobench line of $out, or fail
  local line
  line=$(grep -a '^iobench ' "$out" | tail -n 1 | tr -d '\r')
  if [ -z "$line" ]; then
    echo "bench/disk.sh: $1 run printed no result:" >&2
    tail -n 5 "$out" >&2
    exit 1
  fi
  echo "$line"
}

v_lines=(); q_lines=()
for i in $(seq "$runs"); do
  timeout 600 "$vessel" run --accel emu --cpus 1 --memory 512M --kernel "$kernel" \
    --initrd "$initrd" --cmdline "$base" --disk "$work/tools.img,readonly" \
    --disk "$work/disk.raw" -- sh -c "$script" >"$out" 2>&1 </dev/null || true
  v_lines+=("$(result vessel)")
  # QEMU's microvm guest may hang calibrating its TSC without tsc_early_khz (bench/lib.sh).
  timeout 600 qemu-system-x86_64 -accel tcg -M microvm -cpu qemu64 -m 512 -nographic \
    -no-reboot -kernel "$kernel" -initrd "$initrd" \
    -append "$base $qemu_tsc $cmd" \
    -drive "id=t,file=$work/tools.img,format=raw,if=none,readonly=on" \
    -device virtio-blk-device,drive=t \
    -drive "id=d,file=$work/disk.raw,format=raw,if=none" \
    -device virtio-blk-device,drive=d >"$out" 2>&1 </dev/null || true
  q_lines+=("$(result QEMU)")
done

python3 - "${#v_lines[@]}" "${v_lines[@]}" "${q_lines[@]}" <<'EOF'
import statistics, sys
n = int(sys.argv[1])
def parse(lines):
    vals = {}
    for line in lines:
        for field in line.split()[1:]:
            k, v = field.split("=")
            vals.setdefault(k, []).append(float(v))
    return {k: statistics.median(v) for k, v in vals.items()}
v, q = parse(sys.argv[2:2 + n]), parse(sys.argv[2 + n:])
names = {"seqwrite_mbps": "sequential write, MiB/s",
         "seqread_mbps": "sequential read, MiB/s",
         "randread_iops": "4 KiB random reads, IOPS"}
print(f"{'virtio-blk (median of %d)' % n:34} {'vessel emu':>12} {'QEMU TCG':>12} {'ratio':>7}")
for k, label in names.items():
    print(f"{label:34} {v[k]:12.1f} {q[k]:12.1f} {v[k] / q[k]:7.2f}")
print("ratio = vessel / QEMU (higher is better; target >= 1.00, goal 2.00)")
EOF
