#!/usr/bin/env bash
# Set up (idempotent) and run every test, in release mode so nothing is
# compiled twice: unit tests of the torch-free crates, the nn crate's loss,
# parity and optimiser tests, and the trainer's end-to-end tests (which run
# the built binary alone and under mpirun -n 2 and -n 4). Ends with one line
# that totals every test binary's result.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# CONTRAST_TORCH_INDEX at PyPI's own index: the option's path runs (and checks the
# index offers torch 2.13.0) where only the default index is reachable.
CONTRAST_TORCH_INDEX="${CONTRAST_TORCH_INDEX:-https://pypi.org/simple}" bash "$root/launch/setup.sh"
cd "$root"
# shellcheck source=launch/env.sh
source launch/env.sh
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
