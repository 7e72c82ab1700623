# shellcheck shell=bash
# Source this to build or run contrast by hand: it points cargo's torch-sys at
# the project's venv (torch==2.13.0, used only for its libtorch) and lets Open
# MPI run as root. launch/setup.sh creates the venv.
_contrast_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIRTUAL_ENV="$_contrast_root/.venv"
# `trainer` on the PATH, so `mpirun -n 8 trainer --config ...` works as written.
export PATH="$_contrast_root/target/release:$VIRTUAL_ENV/bin:$HOME/.cargo/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# Open MPI refuses to start as root without these (harmless elsewhere).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Quiet Open MPI's probing of network interfaces on single-host runs.
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"
unset _contrast_root
