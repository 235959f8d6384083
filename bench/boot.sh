#!/usr/bin/env bash
# Times, in one run, vessel's software vCPU and QEMU's TCG booting the same kernel and
# initramfs (the default guest) with the same memory and one vCPU, to a shell command that
# exits at once and powers the machine off; prints both times and the ratio vessel/QEMU.
#
#   bench/boot.sh [RUNS]     (default 3; needs qemu-system-x86 and the default guest)
#
# Both run the guest's /init with `vessel.cmd=` set to `true`, so both do the same work:
# kernel boot, init, the command, `poweroff -f` (ACPI S5; QEMU's microvm has ACPI on).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
command -v qemu-system-x86_64 >/dev/null || { echo "bench/boot.sh: needs qemu-system-x86_64 (apt-get install qemu-system-x86)" >&2; exit 1; }

vessel=${VESSEL:-target/release/vessel}
[ -x "$vessel" ] || cargo build --release -p vessel
"$vessel" guest fetch >/dev/null 2>&1
info=$("$vessel" guest info --json)
kernel=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["kernel"])' "$info")
initrd=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["initrd"])' "$info")
memory=512
base="console=ttyS0 panic=-1 quiet loglevel=3 tsc=reliable"
cmd="vessel.cmd=$(printf true | base64)"

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{float(\"$2\") - float(\"$1\"):.3f}')"; }
mean() { python3 -c 'import sys; v=[float(x) for x in sys.argv[1:]]; print(f"{sum(v)/len(v):.3f}")' "$@"; }

qemu_times=(); vessel_times=(); vessel_failed=""; qemu_hangs=0
for i in $(seq "$runs"); do
  # QEMU's microvm has no HPET or ACPI PM timer: on a busy host its guest sometimes fails
  # to calibrate the TSC against the PIT and then hangs early in boot. Such a run is not
  # timed; it is retried (twice at most) and counted.
  qemu_ok=""
  for attempt in 1 2 3; do
    t0=$(now)
    if timeout 60 qemu-system-x86_64 -accel tcg -M microvm -cpu qemu64 -m "$memory" -nographic \
        -no-reboot -kernel "$kernel" -initrd "$initrd" -append "$base $cmd" >/dev/null 2>&1 </dev/null; then
      t1=$(now); qemu_times+=("$(elapsed "$t0" "$t1")"); qemu_ok=1
      break
    fi
    qemu_hangs=$((qemu_hangs + 1))
  done
  if [ -z "$qemu_ok" ]; then
    echo "bench/boot.sh: qemu-system-x86_64 did not power off within 60 s, three times (run $i)" >&2
    exit 1
  fi

  t0=$(now)
  if timeout 300 "$vessel" run --accel emu --cpus 1 --memory "${memory}M" --kernel "$kernel" \
      --initrd "$initrd" --cmdline "$base" -- true >/dev/null 2>/tmp/vessel-boot-bench.err </dev/null; then
    t1=$(now); vessel_times+=("$(elapsed "$t0" "$t1")")
  else
    vessel_failed="$(tail -n 1 /tmp/vessel-boot-bench.err)"
  fi
done

q=$(mean "${qemu_times[@]}")
echo "qemu-system-x86_64 -accel tcg: ${q} s (mean of ${#qemu_times[@]}: ${qemu_times[*]})"
if [ "$qemu_hangs" -gt 0 ]; then
  echo "  (QEMU hung in boot and was rerun $qemu_hangs time(s); hung runs are not timed)"
fi
if [ ${#vessel_times[@]} -eq "$runs" ]; then
  v=$(mean "${vessel_times[@]}")
  echo "vessel --accel emu:            ${v} s (mean of ${#vessel_times[@]}: ${vessel_times[*]})"
  echo "ratio vessel/qemu: $(python3 -c "print(f'{$v / $q:.2f}')")  (target <= 3.00, goal < 1.00)"
else
  echo "vessel --accel emu:            did not complete the boot: ${vessel_failed}"
  echo "ratio vessel/qemu: n/a"
  exit 1
fi
