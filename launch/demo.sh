#!/usr/bin/env bash
# The built-in default job: set up (idempotent), then a 2-rank SimCLR run on
# Fashion-MNIST that logs the loss falling and ends with kNN top-1 of the
# trained encoder beside the untrained encoder and raw pixels.
#   launch/demo.sh [--set key=value ...]      (NP=4 for four ranks)
# It writes into runs/simclr and resumes there: a second run continues an
# interrupted one, or says that the run is already finished; start it over
# with --set train.resume=false --set checkpoint.overwrite=true, or keep both with --set checkpoint.dir=runs/other.
# CONTRAST_DEMO_SKIP_SETUP=1 skips the set-up step (the tests run the command itself).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ "${CONTRAST_DEMO_SKIP_SETUP:-0}" = 1 ] || bash "$root/launch/setup.sh"
cd "$root"
# shellcheck source=launch/env.sh
source launch/env.sh
exec "$root/launch/mpirun.sh" -n "${NP:-2}" target/release/trainer --config configs/simclr.yaml \
  --set train.resume=true "$@"
