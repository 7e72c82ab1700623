#!/usr/bin/env python3
"""Global-batch sweep: SimCLR (configs/simclr.yaml) on P ranks at several global
batches, with the trainer's allocator policy (freed pages kept) and, in the same
run, jemalloc returning freed pages at once (MALLOC_CONF=dirty_decay_ms:0,...,
which behaves like glibc's mmap of large buffers: every step faults its buffers in).

    target/release/trainer must be built (cargo build --release);
    python3 benches/global_batch_sweep.py [--ranks 2] [--batches 256,1024,4096,16384] [--steps 6] [--set KEY=VALUE]

Per run it prints the wall-clock samples/s of steps.jsonl (data wait included,
median of steps 2..steps-1), its ratio to the smallest batch of the same policy,
the step phases as fractions of the step, the data workers' CPU time per step as a
fraction of the step (work the data wait hides), minor page faults per step and
peak RSS of rank 0. A run that fails (out of memory, say) prints its exit status: a result.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ["data_wait", "forward", "gather", "loss", "reduce_scatter", "backward", "all_reduce", "optimizer"]
POLICIES = {"kept": None, "returned": "dirty_decay_ms:0,muzzy_decay_ms:0"}


def run(ranks, batch, steps, policy, out_dir, config, extra):
    run_dir = os.path.join(out_dir, f"{policy}-{batch}")
    env = dict(os.environ)
    cmd = [os.path.join(ROOT, "launch/mpirun.sh"), "-n", str(ranks)]
    if POLICIES[policy]:
        env["MALLOC_CONF"] = POLICIES[policy]
        cmd += ["-x", "MALLOC_CONF"]
    cmd += [os.path.join(ROOT, "target/release/trainer"), "--config", config]
    for key, value in [("train.global_batch", batch), ("train.steps", steps), ("train.log_every", 1000),
                       ("checkpoint.dir", run_dir), ("checkpoint.every", 0), ("eval.at_end", "false"),
                       ("train.schedule.warmup_steps", 0)] + extra:
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    with open(os.path.join(run_dir, "steps.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    timed = rows[1:-1] if len(rows) > 2 else rows
    med = lambda key: statistics.median(r[key] for r in timed)
    total = statistics.median(sum(r["phase_s"].values()) for r in timed)
    fractions = {p: statistics.median(r["phase_s"][p] for r in timed) / total for p in PHASES}
    return {"samples_per_s": med("samples_per_s"), "faults": med("minor_faults"), "data_cpu": med("data_cpu_s") / total,
            "rss_gib": rows[-1]["peak_rss_bytes"] / 2**30, "fractions": fractions}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batches", default="256,1024,4096,16384")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--policies", default="kept,returned")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs/simclr.yaml"))
    ap.add_argument("--micro-batch", type=int, default=0, help="train.micro_batch (the gradient cache; 0 = off)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another config override")
    args = ap.parse_args()
    extra = [("train.micro_batch", args.micro_batch)] if args.micro_batch else []
    extra += [tuple(kv.split("=", 1)) for kv in args.set]
    batches = [int(b) for b in args.batches.split(",")]
    short = {"data_wait": "wait", "forward": "fwd", "gather": "gath", "loss": "loss",
             "reduce_scatter": "rs", "backward": "bwd", "all_reduce": "ar", "optimizer": "opt"}
    micro = f", train.micro_batch={args.micro_batch}" if args.micro_batch else ""
    micro += "".join(f", {kv}" for kv in args.set)
    print(f"SimCLR ({os.path.relpath(args.config, ROOT)}{micro}) on {args.ranks} ranks; median of steps 2..{args.steps - 1}")
    head = f"{'pages':>9} {'G':>6} {'samples/s':>10} {'vs first':>8} {'faults/step':>12} {'RSS GiB':>8}  "
    print(head + " ".join(f"{short[p]:>5}" for p in PHASES) + f" {'data cpu':>8}  (fractions of the step)")
    with tempfile.TemporaryDirectory(prefix="contrast-sweep-") as out_dir:
        for policy in args.policies.split(","):
            first = None
            for batch in batches:
                r = run(args.ranks, batch, args.steps, policy, out_dir, args.config, extra)
                if "error" in r:
                    print(f"{policy:>9} {batch:>6} {r['error']}")
                    continue
                first = first or r["samples_per_s"]
                fr = " ".join(f"{r['fractions'][p]:>5.2f}" for p in PHASES)
                print(f"{policy:>9} {batch:>6} {r['samples_per_s']:>10.0f} {r['samples_per_s'] / first:>8.2f} "
                      f"{r['faults']:>12.0f} {r['rss_gib']:>8.2f}  {fr} {r['data_cpu']:>8.2f}")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
