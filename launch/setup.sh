#!/usr/bin/env bash
# Set up contrast on a Debian machine, idempotently:
#   1. Debian packages: Open MPI (+ libclang for the MPI bindings), Fashion-MNIST,
#      fortunes (converted into data/fortunes/, the text methods' corpus);
#   2. a venv with torch==2.13.0 (for its libtorch; torchvision==0.28.0 only as
#      the data benchmark's baseline), cached outside the
#      clone in ~/.cache/contrast (override: CONTRAST_VENV) and linked as .venv;
#      torch comes from CONTRAST_TORCH_INDEX when set (a package index URL, e.g.
#      https://download.pytorch.org/whl/cpu for a CPU-only build without the
#      default wheel's 4.7 GB of CUDA libraries), else from PyPI; the venv also
#      gets safetensors, onnx, onnxscript, onnxruntime and tensorboard (tools/);
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
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
torch_index=()
if [ -n "${CONTRAST_TORCH_INDEX:-}" ]; then
  torch_index=(--index-url "$CONTRAST_TORCH_INDEX")
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 1)" 2>/dev/null; then
  echo "setup: creating $venv with torch==2.13.0 from ${CONTRAST_TORCH_INDEX:-PyPI} (once per machine; PyPI's wheel brings about 4.7 GB)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "${pip[@]}" install --quiet "${torch_index[@]}" torch==2.13.0 torchvision==0.28.0
fi
# A given index must offer torch 2.13.0: checked even when the venv exists, so a
# mistyped URL fails here, naming itself, and not on the next machine.
if [ -n "${CONTRAST_TORCH_INDEX:-}" ]; then
  offered="$("${pip[@]}" index versions torch "${torch_index[@]}" 2>/dev/null || true)"
  case "$offered" in
    *"2.13.0"*) ;;
    *) echo "setup: CONTRAST_TORCH_INDEX=$CONTRAST_TORCH_INDEX does not offer torch 2.13.0 (or cannot be reached)" >&2
       exit 1 ;;
  esac
fi
# torchvision is only the baseline of benches/data.rs (small; torch stays pinned).
if ! "$venv/bin/python" -c "import torchvision, sys; sys.exit(0 if torchvision.__version__.split('+')[0] == '0.28.0' else 1)" 2>/dev/null; then
  "${pip[@]}" install --quiet "${torch_index[@]}" torch==2.13.0 torchvision==0.28.0
fi
# safetensors: tools/convert_weights.py and the weight-import round-trip test;
# onnx, onnxscript, onnxruntime: ONNX export and its check; tensorboard: run logs.
tools=(safetensors onnx onnxscript onnxruntime tensorboard)
if ! "$venv/bin/python" -c "import safetensors, onnx, onnxscript, onnxruntime, tensorboard" 2>/dev/null; then
  echo "setup: installing ${tools[*]} into $venv"
  "${pip[@]}" install --quiet "${tools[@]}"
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
