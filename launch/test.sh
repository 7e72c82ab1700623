#!/usr/bin/env bash
# Set up (idempotent) and run every test, in release mode so nothing is
# compiled twice: unit tests of the torch-free crates, the nn crate's loss,
# parity and optimiser tests, and the trainer's end-to-end tests (which run
# the built binary alone and under mpirun -n 2 and -n 4).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
# shellcheck source=launch/env.sh
source launch/env.sh
cargo test --release --workspace "$@"
