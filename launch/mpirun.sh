#!/usr/bin/env bash
# mpirun with the flags this project needs on small machines: with Open MPI,
# allow more ranks than cores (--oversubscribe) and running as root. MPICH's
# mpirun takes the arguments as they are.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/env.sh
source "$root/launch/env.sh"
if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
  exec mpirun --oversubscribe "$@"
fi
exec mpirun "$@"
