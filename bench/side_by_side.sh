#!/usr/bin/env bash
# Open MPI and multiworld on this machine, interleaved: per repetition the core-to-core probe,
# Open MPI's shapes (../shared/bench/run_mpi.sh: single copy by CMA, then copy-in/copy-out),
# then `mw-bench --osu` (the same shapes); at the end one table of medians with the ratio per
# row (`mw-bench --osu-table`). Usage: bench/side_by_side.sh [--reps N] [--out FILE]
# The Open MPI side installs Open MPI from apt when mpicc is missing (root).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mpi_dir=${MW_MPI_BENCH:-$root/../shared/bench}
reps=3; out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps=$2; shift ;;
    --out) out=$2; shift ;;
    *) echo "usage: $0 [--reps N] [--out FILE]" >&2; exit 2 ;;
  esac
  shift
done
[ -x "$mpi_dir/run_mpi.sh" ] || { echo "no $mpi_dir/run_mpi.sh (set MW_MPI_BENCH)" >&2; exit 2; }
out=${out:-$(mktemp)}
build=$(mktemp -d)
(cd "$root" && cargo build --release --bin mw-bench >&2)
bench="$root/target/release/mw-bench"
: > "$out"
probe() { "$build/memcpy_bench" --c2c-only --quick | sed "s/\$/ rep=$rep side=$1/" | tee -a "$out" >&2; }
for rep in $(seq 1 "$reps"); do
  echo "# repetition $rep of $reps" >&2
  # The probe before and after each side's run: a run counts on a plateau only if both agree.
  bash "$mpi_dir/run_mpi.sh" --reps 1 --out "$build" | sed "s/rep=1/rep=$rep/" | tee -a "$out" >&2
  probe mpi-after
  probe mw
  "$bench" --osu | grep '^mw ' | sed "s/\$/ rep=$rep/" | tee -a "$out" >&2
  probe mw-after
done
echo "# lines in $out" >&2
"$bench" --osu-table "$out"
