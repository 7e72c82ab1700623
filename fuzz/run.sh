#!/usr/bin/env bash
# Fuzz every reader of a user's file with libFuzzer, for a fixed time per
# target (not part of CI):
#   fuzz/run.sh [SECONDS_PER_TARGET=60] [TARGET ...]
# Targets: config yaml_shape idx image csv webdataset tokenizer synonyms checkpoint.
#
# libFuzzer comes from the libfuzzer-sys crate; the targets are instrumented
# with the same SanitizerCoverage flags `cargo fuzz build -s none` passes, on
# the stable toolchain (no sanitizer: -Zsanitizer needs nightly). `--target`
# keeps build scripts uninstrumented. Seeds are in fuzz/corpus/<target>; what
# the fuzzer adds goes to fuzz/work/<target>, crashes to fuzz/artifacts/<target>.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=launch/env.sh
source launch/env.sh
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config yaml_shape idx image csv webdataset tokenizer synonyms checkpoint)
host="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
cargo build --release --manifest-path fuzz/Cargo.toml --target "$host" --bins
torch_lib="$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")"
printf '%-11s %10s %8s %s\n' target executions crashes seconds
for t in "${targets[@]}"; do
  mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t" "fuzz/corpus/$t"
  log="fuzz/work/$t.log"
  LD_LIBRARY_PATH="$torch_lib" "fuzz/target/$host/release/$t" -max_total_time="$secs" -print_final_stats=1 \
    -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 -artifact_prefix="fuzz/artifacts/$t/" \
    "fuzz/work/$t" "fuzz/corpus/$t" >"$log" 2>&1 || true
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  crashes="$(find "fuzz/artifacts/$t" -type f | wc -l)"
  printf '%-11s %10s %8s %s\n' "$t" "${execs:-?}" "$crashes" "$secs"
done
