# Shared by the bench scripts (sourced, not run).

# vessel's data directory, found as vessel finds it (guest::default_data_dir).
vessel_data_dir() {
  if [ -n "${VESSEL_DATA_DIR:-}" ]; then echo "$VESSEL_DATA_DIR"
  elif [[ "${XDG_DATA_HOME:-}" == /* ]]; then echo "$XDG_DATA_HOME/vessel"
  elif [ -n "${HOME:-}" ]; then echo "$HOME/.local/share/vessel"
  else echo /var/lib/vessel; fi
}

# start_daemons WORK: a vessel daemon on $VESSEL_SOCKET with its state under WORK, and a
# containerd of its own on WORK/containerd.sock (unless NO_CONTAINERD is set); sets
# vd_pid and cd_pid and waits for their sockets.
start_daemons() {
  local work=$1
  "$vessel" daemon --state-dir "$work/state" >"$work/vessel.log" 2>&1 &
  vd_pid=$!
  if [ -z "${NO_CONTAINERD:-}" ]; then
    containerd --address "$work/containerd.sock" --root "$work/containerd-root" \
      --state "$work/containerd-state" >"$work/containerd.log" 2>&1 &
    cd_pid=$!
  fi
  for _ in $(seq 100); do
    [ -S "$VESSEL_SOCKET" ] && { [ -n "${NO_CONTAINERD:-}" ] || [ -S "$work/containerd.sock" ]; } && return 0
    sleep 0.1
  done
  echo "bench: the daemons did not listen (see $work/*.log)" >&2
  return 1
}

# stop_daemons: ends what start_daemons started.
stop_daemons() {
  [ -n "${vd_pid:-}" ] && kill "$vd_pid" 2>/dev/null || true
  [ -n "${cd_pid:-}" ] && kill "$cd_pid" 2>/dev/null || true
  [ -n "${vd_pid:-}" ] && wait "$vd_pid" 2>/dev/null || true
  [ -n "${cd_pid:-}" ] && wait "$cd_pid" 2>/dev/null || true
}

# containers_bench_setup NAME: the common start of the container benches (NAME is the
# script's): root, containerd, ctr and python3 present; $vessel built; the busybox root
# in $root; a work directory in $work, with $VESSEL_SOCKET and $ctr_sock in it.
containers_bench_setup() {
  local name=$1
  [ "$(id -u)" = 0 ] || { echo "bench/$name: needs root" >&2; exit 1; }
  for tool in containerd ctr python3; do
    command -v "$tool" >/dev/null || { echo "bench/$name: needs $tool" >&2; exit 1; }
  done
  vessel=${VESSEL:-target/release/vessel}
  [ -x "$vessel" ] || cargo build --release -p vessel
  vessel=$(realpath "$vessel")
  "$vessel" run --container -- true   # fetches busybox and builds the default root once
  root=$(vessel_data_dir)/container/busybox-root
  work=$(mktemp -d "/tmp/vessel-${name%.sh}.XXXXXX")
  export VESSEL_SOCKET=$work/vessel.sock
  ctr_sock=$work/containerd.sock
}

# ctr against the bench's own containerd, in a namespace of its own.
ctr() { command ctr --address "$ctr_sock" --namespace vessel-bench "$@"; }

# remove_instances NAME...: the vessel instances and the containerd containers of these
# names, gone (whichever exist).
remove_instances() {
  for name in "$@"; do
    "$vessel" rm --force "$name" >/dev/null 2>&1 || true
    ctr task kill -s KILL "$name" >/dev/null 2>&1 || true
  done
  sleep 1
  for name in "$@"; do
    ctr task delete -f "$name" >/dev/null 2>&1 || true
    ctr container delete "$name" >/dev/null 2>&1 || true
  done
}

# default_guest: $vessel (VESSEL, else the release build, built if missing), and the
# default guest's $kernel and $initrd, fetched if missing.
default_guest() {
  vessel=${VESSEL:-target/release/vessel}
  [ -x "$vessel" ] || cargo build --release -p vessel
  "$vessel" guest fetch >/dev/null 2>&1
  local info
  info=$("$vessel" guest info --json)
  kernel=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["kernel"])' "$info")
  initrd=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["initrd"])' "$info")
}

# qemu_tsc_khz: `tsc_early_khz=N` for QEMU's microvm guests, N the host's TSC frequency as
# bench/tools/tsckhz.rs measures it. The guest would otherwise calibrate its TSC against
# the PIT, which on these hosts often fails and hangs the boot; a guessed figure instead
# makes its clock run fast or slow, and every time measured inside the guest with it.
qemu_tsc_khz() {
  local dir
  dir=$(mktemp -d /tmp/vessel-tsckhz.XXXXXX)
  rustc -O bench/tools/tsckhz.rs -o "$dir/tsckhz" >&2 || { rm -rf "$dir"; return 1; }
  echo "tsc_early_khz=$("$dir/tsckhz")"
  rm -rf "$dir"
}
