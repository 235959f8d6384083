#!/usr/bin/env bash
# virtio-net TCP throughput of the same guest on vessel's software vCPU and on QEMU's TCG,
# in one run, over a tap in a network namespace this script makes (no packet leaves it):
# 64 MiB from the guest to the host, then 64 MiB from the host to the guest, each timed on
# the host from the first byte to the last. The guest's end is bench/tools/netbench.rs
# (built static here, on a small read-only disk): it sends and receives in 128 KiB
# calls, as iperf3 does, so the figures are the NIC's and not a 1 KiB copy loop's. Both
# VMMs get the same kernel and initramfs (the default guest), 512 MiB, one vCPU, a
# virtio-mmio NIC on the same tap and the same tools disk. Runs alternate between the
# two; the figures are medians; a run that moves fewer bytes fails the script.
#
#   bench/net.sh [RUNS]     (default 3; needs root, qemu-system-x86, iproute2, python3,
#                            e2fsprogs, rustc)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
# shellcheck source=bench/lib.sh
. bench/lib.sh
qemu_tsc=$(qemu_tsc_khz)
[ "$(id -u)" = 0 ] || { echo "bench/net.sh: needs root (a network namespace and a tap)" >&2; exit 1; }
for tool in qemu-system-x86_64 ip python3 mkfs.ext4 rustc; do
  command -v "$tool" >/dev/null || { echo "bench/net.sh: needs $tool" >&2; exit 1; }
done
default_guest
# The guest runs in the namespace from another directory.
vessel=$(realpath "$vessel")

ns=vessel-bench-$$
work=$(mktemp -d /tmp/vessel-net-bench.XXXXXX)
cleanup() { ip netns del "$ns" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" tuntap add vtap0 mode tap
ip -n "$ns" addr add 10.0.2.1/24 dev vtap0
ip -n "$ns" link set vtap0 up
mkdir "$work/tools"
rustc -O -C target-feature=+crt-static -C strip=symbols bench/tools/netbench.rs \
  -o "$work/tools/netbench"
mkfs.ext4 -q -d "$work/tools" "$work/tools.img" 16M

# The host side: take 64 MiB on port 5001 (the guest's upload), then connect to the guest's
# port 5002 and send 64 MiB; print both rates in MiB/s.
cat >"$work/host.py" <<'EOF'
import socket, sys, time
SIZE = 64 << 20
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("10.0.2.1", 5001)); srv.listen(1); srv.settimeout(300)
c, _ = srv.accept(); c.settimeout(120)
got, t0 = 0, None
while got < SIZE:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.monotonic()
    got += len(b)
up = time.monotonic() - t0
c.close()
if got != SIZE: sys.exit(f"upload: {got} bytes")
deadline = time.monotonic() + 120
while True:
    try:
        s = socket.create_connection(("10.0.2.2", 5002), timeout=5); break
    except OSError:
        if time.monotonic() > deadline: sys.exit("the guest never listened")
        time.sleep(0.1)
block, sent = b"\x5a" * (1 << 20), 0
t0 = time.monotonic()
while sent < SIZE: sent += s.send(block[: SIZE - sent])
s.shutdown(socket.SHUT_WR)
rest = s.recv(16)   # the guest closes once it has everything
down = time.monotonic() - t0
print(f"net up_mibps={64 / up:.1f} down_mibps={64 / down:.1f}")
EOF
script='ip addr add 10.0.2.2/24 dev eth0 && ip link set eth0 up && mount -o ro /dev/vda /mnt &&
/mnt/netbench send 10.0.2.1:5001 64 && /mnt/netbench recv 5002'
b64() { printf %s "$1" | base64 -w0; }
cmd="vessel.cmd=$(b64 sh),$(b64 -c),$(b64 "$script")"
base="console=ttyS0 panic=-1 quiet tsc=reliable"

one() {  # one run of the VMM command "$@" in the namespace; prints the host's line
  ip netns exec "$ns" python3 "$work/host.py" >"$work/host.out" 2>&1 &
  local host=$!
  sleep 0.3
  ip netns exec "$ns" timeout 600 "$@" >"$work/vm.out" 2>&1 </dev/null || true
  if ! wait "$host" || ! grep -q '^net ' "$work/host.out"; then
    echo "bench/net.sh: a run did not move all its bytes:" >&2
    tail -n 3 "$work/host.out" "$work/vm.out" >&2
    exit 1
  fi
  grep '^net ' "$work/host.out"
}

v_lines=(); q_lines=()
for i in $(seq "$runs"); do
  v_lines+=("$(one "$vessel" run --accel emu --cpus 1 --memory 512M --kernel "$kernel" \
    --initrd "$initrd" --cmdline "$base" --disk "$work/tools.img,readonly" --net tap=vtap0 \
    -- sh -c "$script")")
  q_lines+=("$(one qemu-system-x86_64 -accel tcg -M microvm -cpu qemu64 -m 512 -nographic \
    -no-reboot -kernel "$kernel" -initrd "$initrd" -append "$base $qemu_tsc $cmd" \
    -drive "id=t,file=$work/tools.img,format=raw,if=none,readonly=on" \
    -device virtio-blk-device,drive=t \
    -netdev tap,id=n0,ifname=vtap0,script=no,downscript=no -device virtio-net-device,netdev=n0)")
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
print(f"{'virtio-net TCP (median of %d)' % n:34} {'vessel emu':>12} {'QEMU TCG':>12} {'ratio':>7}")
for k, label in [("up_mibps", "guest to host, MiB/s"), ("down_mibps", "host to guest, MiB/s")]:
    print(f"{label:34} {v[k]:12.1f} {q[k]:12.1f} {v[k] / q[k]:7.2f}")
print("ratio = vessel / QEMU (higher is better; target >= 1.00, goal 2.00)")
EOF
