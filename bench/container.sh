#!/usr/bin/env bash
# Times `vessel run --container -- true` against `runc run` of an equivalent busybox
# bundle (same root, `true` as the command) and `vessel-runc run` of that same bundle,
# and prints the medians and the vessel/runc ratio.
#
#   bench/container.sh [RUNS]          (default 50; needs root and runc; hyperfine if present)
#
# vessel: the release build (built here if missing), its default busybox root.
# runc: a bundle from `runc spec` with the same root copied in, no terminal.
# vessel also mounts an overlay (a writable, discarded layer), which runc's default
# (read-only root) does not; so vessel does a little more work per run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
runs=${1:-50}
[ "$(id -u)" = 0 ] || { echo "bench/container.sh: needs root" >&2; exit 1; }
command -v runc >/dev/null || { echo "bench/container.sh: needs runc (apt-get install runc)" >&2; exit 1; }

vessel=${VESSEL:-target/release/vessel}
[ -x "$vessel" ] && [ -x "$(dirname "$vessel")/vessel-runc" ] || cargo build --release -p vessel
vessel=$(realpath "$vessel")
vrunc=$(dirname "$vessel")/vessel-runc
"$vessel" run --container -- true   # fetches busybox and builds the default root once
data=$(vessel_data_dir)
root=$data/container/busybox-root
[ -x "$root/bin/busybox" ] || { echo "bench/container.sh: no busybox root at $root" >&2; exit 1; }

bundle=$(mktemp -d /tmp/vessel-bench.XXXXXX)
trap 'runc delete -f vessel-bench >/dev/null 2>&1 || true; "$vrunc" delete -f vessel-bench >/dev/null 2>&1 || true; rm -rf "$bundle"' EXIT
cp -a "$root" "$bundle/rootfs"
(cd "$bundle" && runc spec)
sed -i -e 's/"terminal": true/"terminal": false/' \
       -e 's/^\(\s*\)"sh"$/\1"true"/' "$bundle/config.json"
grep -q '"true"' "$bundle/config.json" || { echo "bench/container.sh: cannot edit config.json" >&2; exit 1; }

v_cmd="$vessel run --container -- true"
r_cmd="runc run --bundle $bundle vessel-bench"
o_cmd="$vrunc run --bundle $bundle vessel-bench"
$r_cmd; $o_cmd   # sanity: both must succeed

# Every timed run must exit 0: hyperfine stops on a failing command, and the loop below
# does the same, so a failure is never averaged into a figure.
if command -v hyperfine >/dev/null; then
  json="$bundle/result.json"
  hyperfine -N --warmup 5 --runs "$runs" --export-json "$json" "$v_cmd" "$r_cmd" "$o_cmd" >&2
  read -r v r o < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["results"]; print(*(x["median"]*1000 for x in d))' "$json")
else
  # Interleaved: one run of each command per round, so host noise hits all three alike.
  declare -a tv tr to
  time_one() {  # COMMAND... -> milliseconds, or exit the script if it fails
    local start end
    start=$(date +%s%N)
    if ! "$@" >/dev/null; then
      echo "bench/container.sh: a timed run failed: $*" >&2
      exit 1
    fi
    end=$(date +%s%N)
    last_ms=$(( (end - start) / 1000 ))
  }
  # shellcheck disable=SC2086
  for _ in $(seq "$runs"); do
    time_one $v_cmd; tv+=("$last_ms")
    time_one $r_cmd; tr+=("$last_ms")
    time_one $o_cmd; to+=("$last_ms")
  done
  median_ms() { python3 -c 'import statistics, sys; print(statistics.median(int(x) for x in sys.argv[1:]) / 1000)' "$@"; }
  v=$(median_ms "${tv[@]}"); r=$(median_ms "${tr[@]}"); o=$(median_ms "${to[@]}")
fi
printf 'vessel run --container -- true: %.2f ms\n' "$v"
printf 'runc run (busybox bundle):      %.2f ms\n' "$r"
printf 'vessel-runc run (same bundle):  %.2f ms\n' "$o"
python3 -c "import sys; print('ratio vessel/runc: %.2f' % (float(sys.argv[1]) / float(sys.argv[2])))" "$v" "$r"

# Peak memory (largest resident set among the process and everything it waited for),
# one run each, measured by the kernel's rusage accounting.
peak_kib() {
  python3 -c 'import resource, subprocess, sys
subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)' "$@"
}
# shellcheck disable=SC2086
printf 'peak RSS: vessel %s KiB, runc %s KiB, vessel-runc %s KiB\n' \
  "$(peak_kib $v_cmd)" "$(peak_kib $r_cmd)" "$(peak_kib $o_cmd)"

# crun, where the host allows it (it refuses hybrid cgroup hosts).
if command -v crun >/dev/null; then
  if crun run --bundle "$bundle" vessel-bench-crun >/dev/null 2>"$bundle/crun.err"; then
    c_cmd="crun run --bundle $bundle vessel-bench-crun"
    start=$(date +%s%N)
    for _ in $(seq "$runs"); do
      $c_cmd >/dev/null || { echo "bench/container.sh: a timed crun run failed" >&2; exit 1; }
    done
    end=$(date +%s%N)
    printf 'crun run (same bundle):         %.2f ms (mean)\n' "$(echo "scale=3; ($end - $start) / 1000000 / $runs" | bc)"
  else
    echo "crun: refused on this host: $(head -n 1 "$bundle/crun.err")"
  fi
else
  echo "crun: not installed (apt-get install crun)"
fi
