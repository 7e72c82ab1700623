#!/usr/bin/env bash
# The GPU check of the CUDA path, for one GPU node where the project is built
# (launch/setup.sh, then this script builds what it needs). Under 5 minutes:
#  1. the parity suite on the GPU (CONTRAST_TEST_DEVICE=cuda): P ranks × B equals
#     1 rank × P·B in f64 and f32, the gradient cache, small overlapped buckets;
#     the collectives stage through pinned host memory;
#  2. samples/s of a CLIP step with configs/clip_vit.yaml's towers (ViT-B/32 at
#     224 px, 12-layer text tower) on the GPU, doubling the batch from 32 until
#     it no longer fits (or 4 minutes have passed); the largest that ran is printed.
# Usage: launch/gpu-check.sh [max-global-batch]   (default 4096)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=launch/env.sh
source launch/env.sh
max="${1:-4096}"
if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
echo "== parity on the GPU"
CONTRAST_TEST_DEVICE=cuda cargo test --release -p contrast-nn --test tests -- parity:: overlap:: 2>&1 | grep -E -A1 "^test |test result|panicked"
echo "== CLIP ViT-B/32 step on the GPU"
cargo build --release -p contrast-benches --bin step_bench 2>&1 | tail -1
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
best="none"
start=$SECONDS
for ((g = 32; g <= max; g *= 2)); do
  if line="$(timeout 120 target/release/step_bench --method clip --vit-b32 --device cuda \
      --global-batch "$g" --steps 6 --out "$out" 2>"$out/err" | tail -1)" && [[ -n "$line" ]]; then
    echo "$line"
    best="$line"
  else
    echo "global batch $g: did not run ($(tail -1 "$out/err" | cut -c1-160))"
    break
  fi
  if ((SECONDS - start > 240)); then echo "(4 minutes spent: stopping the search)"; break; fi
done
echo "largest that ran: $best"
