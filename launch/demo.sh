#!/usr/bin/env bash
# The built-in default job: set up (idempotent), then a 2-rank SimCLR run on
# Fashion-MNIST that logs the loss falling and ends with kNN top-1 of the
# trained encoder beside the untrained encoder and raw pixels.
#   launch/demo.sh [--set key=value ...]      (NP=4 for four ranks)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
# shellcheck source=launch/env.sh
source launch/env.sh
exec "$root/launch/mpirun.sh" -n "${NP:-2}" target/release/trainer --config configs/simclr.yaml "$@"
