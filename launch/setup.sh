#!/usr/bin/env bash
# Set up contrast on a Debian machine, idempotently:
#   1. Debian packages: Open MPI (+ libclang for the MPI bindings), Fashion-MNIST,
#      fortunes (converted into data/fortunes/, the text methods' corpus);
#   2. a venv with torch==2.13.0 (for its libtorch; torchvision==0.28.0 only as
#      the data benchmark's baseline), cached outside the
#      clone in ~/.cache/contrast (override: CONTRAST_VENV) and linked as .venv;
#   3. a release build of the workspace (binaries find libtorch by rpath).
# Re-running it does only what is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

packages=(libopenmpi-dev openmpi-bin libclang-dev dataset-fashion-mnist fortunes pkg-config python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The sentence corpus of configs/simcse.yaml and configs/quick_thought.yaml
# (data/fortunes/{train,test}.tsv), rewritten when the converter changes.
if [ ! -s data/fortunes/train.tsv ] || [ tools/fortunes_to_lines.py -nt data/fortunes/train.tsv ]; then
  python3 tools/fortunes_to_lines.py --out data/fortunes
fi

venv="${CONTRAST_VENV:-$HOME/.cache/contrast/venv-torch-2.13.0}"
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 1)" 2>/dev/null; then
  echo "setup: creating $venv with torch==2.13.0 (about 4.7 GB, once per machine)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0 torchvision==0.28.0
fi
# torchvision is only the baseline of benches/data.rs (small; torch stays pinned).
if ! "$venv/bin/python" -c "import torchvision, sys; sys.exit(0 if torchvision.__version__.split('+')[0] == '0.28.0' else 1)" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0 torchvision==0.28.0
fi
# safetensors: tools/convert_weights.py and the weight-import round-trip test.
if ! "$venv/bin/python" -c "import safetensors" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check safetensors
fi
ln -sfn "$venv" "$root/.venv"

if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "setup: cargo not found; install the Rust toolchain (rustup) first" >&2
  exit 1
fi
# shellcheck source=launch/env.sh
source "$root/launch/env.sh"
echo "setup: cargo build --release"
cargo build --release --quiet
# `trainer` on the PATH for new shells (Debian's ~/.profile adds ~/.local/bin when it exists).
mkdir -p "$HOME/.local/bin"
ln -sfn "$root/target/release/trainer" "$HOME/.local/bin/trainer"
echo "setup: ready: $root/target/release/trainer (linked as ~/.local/bin/trainer)"
case ":$PATH:" in
  *":$HOME/.local/bin:"*) ;;
  *) echo "setup: to run \`trainer\` by name: export PATH=\"\$HOME/.local/bin:\$PATH\" (or: source launch/env.sh)" ;;
esac
