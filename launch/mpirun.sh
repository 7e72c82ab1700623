#!/usr/bin/env bash
# mpirun with the flags this project needs on small machines: with Open MPI,
# allow more ranks than cores (--oversubscribe) and running as root, and leave
# ranks unbound (--bind-to none) unless the caller passes its own --bind-to or
# --map-by. Open MPI binds each rank to one core when there are at most two
# ranks, which would give each rank one libtorch thread however many cores the
# host has (docs/cluster.md, "Binding"). MPICH's mpirun (Hydra) binds nothing by
# default and takes the arguments as they are.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/env.sh
source "$root/launch/env.sh"
if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
  bind=(--bind-to none)
  for arg in "$@"; do
    case "$arg" in
      --bind-to | --bind-to=* | --map-by | --map-by=* | -bind-to | -map-by) bind=() ;;
    esac
  done
  exec mpirun --oversubscribe "${bind[@]}" "$@"
fi
exec mpirun "$@"
