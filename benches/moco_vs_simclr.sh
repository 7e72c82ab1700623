#!/usr/bin/env bash
# MoCo's point: negatives no longer need a big batch. MoCo-v2 with a queue of
# K = 4096 against SimCLR, both at global batch 64 with the same encoder on
# Fashion-MNIST, 2 ranks: at equal steps, and SimCLR again at MoCo's wall time
# (its step count scaled by the measured training throughputs). Prints kNN top-1.
#   benches/moco_vs_simclr.sh [STEPS]          (default 1500; about 12 minutes on 2 cores)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=launch/env.sh
source launch/env.sh
steps="${1:-1500}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
run() { # name config steps [--set ...]
  local name=$1 config=$2 n=$3
  shift 3
  launch/mpirun.sh -n 2 target/release/trainer --config "configs/$config.yaml" \
    --set train.global_batch=64 --set train.steps="$n" --set checkpoint.dir="$out/$name" \
    --set checkpoint.every=0 "$@" >"$out/$name.log" 2>&1
}
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$out/$1/summary.json" "$2"; }
seconds() { python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['steps']*s['global_batch']/s['samples_per_s'])" "$out/$1/summary.json"; }

run moco mocov2 "$steps" --set method.queue_size=4096
run simclr simclr "$steps"
# SimCLR for the training time MoCo took.
equal=$(python3 -c "print(max(1, round($steps * $(seconds moco) / $(seconds simclr))))")
run simclr-time simclr "$equal"
printf '%-28s %8s %10s %10s\n' run steps "train s" "kNN top-1"
for r in moco simclr simclr-time; do
  printf '%-28s %8s %10.1f %10.4f\n' "$r" "$(field $r steps)" "$(seconds $r)" "$(field $r knn_top1)"
done
printf 'untrained encoder %.4f, raw pixels %.4f\n' "$(field moco knn_top1_init)" "$(field moco knn_top1_raw_pixels)"
