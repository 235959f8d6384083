#!/usr/bin/env bash
# Times, in one run, vessel's software vCPU and QEMU's TCG booting the same kernel and
# initramfs (the default guest) with the same memory and one vCPU, to a shell command that
# exits at once and powers the machine off; prints both times and the ratio vessel/QEMU.
#
#   bench/boot.sh [RUNS]     (default 3; needs qemu-system-x86 and the default guest)
#
# Both run the guest's /init with `vessel.cmd=` set to `echo vessel-bench-ok`, so both do
# the same work: kernel boot, init, the command, `poweroff -f` (ACPI S5; QEMU's microvm has
# ACPI on). A run counts only if the guest printed that line and the VMM exited 0; any
# other run of either side fails the script. Runs alternate between the two, and the
# figures are medians.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
# shellcheck source=bench/lib.sh
. bench/lib.sh
command -v qemu-system-x86_64 >/dev/null || { echo "bench/boot.sh: needs qemu-system-x86_64 (apt-get install qemu-system-x86)" >&2; exit 1; }

default_guest
memory=512
base="console=ttyS0 panic=-1 quiet tsc=reliable"
marker=vessel-bench-ok
# argv ["echo", MARKER] as the guest's /init reads it: each argument in base64, commas between.
cmd="vessel.cmd=$(printf echo | base64 -w0),$(printf %s "$marker" | base64 -w0)"
# QEMU's microvm has no HPET or ACPI PM timer: its guest calibrates the TSC against the
# PIT, which on a busy host often fails and hangs the boot; tsc_early_khz skips that.
# vessel's vCPU reports its TSC frequency in CPUID, so its guest never calibrates.
qemu_extra=$(qemu_tsc_khz)
out=$(mktemp /tmp/vessel-boot-bench.XXXXXX)
trap 'rm -f "$out"' EXIT

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{float(\"$2\") - float(\"$1\"):.3f}')"; }
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.3f}")' "$@"; }

qemu_times=(); vessel_times=(); qemu_hangs=0
for i in $(seq "$runs"); do
  # A QEMU boot that hangs anyway (no output, killed at 60 s) is not timed; it is retried
  # (twice at most) and counted.
  qemu_ok=""
  for attempt in 1 2 3; do
    t0=$(now)
    set +e
    timeout 60 qemu-system-x86_64 -accel tcg -M microvm -cpu qemu64 -m "$memory" -nographic \
        -no-reboot -kernel "$kernel" -initrd "$initrd" -append "$base $qemu_extra $cmd" \
        >"$out" 2>&1 </dev/null
    status=$?
    set -e
    t1=$(now)
    if [ "$status" = 124 ]; then
      qemu_hangs=$((qemu_hangs + 1))
      continue
    fi
    if [ "$status" != 0 ] || ! grep -q "^$marker" "$out"; then
      echo "bench/boot.sh: QEMU run $i exited $status without the guest's output line:" >&2
      tail -n 5 "$out" >&2
      exit 1
    fi
    qemu_times+=("$(elapsed "$t0" "$t1")"); qemu_ok=1
    break
  done
  if [ -z "$qemu_ok" ]; then
    echo "bench/boot.sh: qemu-system-x86_64 did not power off within 60 s, three times (run $i)" >&2
    exit 1
  fi

  t0=$(now)
  set +e
  timeout 300 "$vessel" run --accel emu --cpus 1 --memory "${memory}M" --kernel "$kernel" \
      --initrd "$initrd" --cmdline "$base" -- echo "$marker" >"$out" 2>&1 </dev/null
  status=$?
  set -e
  t1=$(now)
  if [ "$status" != 0 ] || ! grep -q "^$marker" "$out"; then
    echo "bench/boot.sh: vessel run $i exited $status without the guest's output line:" >&2
    tail -n 5 "$out" >&2
    exit 1
  fi
  vessel_times+=("$(elapsed "$t0" "$t1")")
done

q=$(median "${qemu_times[@]}")
v=$(median "${vessel_times[@]}")
echo "qemu-system-x86_64 -accel tcg: ${q} s (median of ${#qemu_times[@]}: ${qemu_times[*]})"
if [ "$qemu_hangs" -gt 0 ]; then
  echo "  (QEMU hung in boot and was rerun $qemu_hangs time(s); hung runs are not timed)"
fi
echo "vessel --accel emu:            ${v} s (median of ${#vessel_times[@]}: ${vessel_times[*]})"
echo "ratio vessel/qemu: $(python3 -c "print(f'{$v / $q:.2f}')")  (target <= 1.00, goal 0.60)"
