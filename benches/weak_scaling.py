#!/usr/bin/env python3
"""Weak scaling: a SimCLR step (target/release/step_bench) at P = 1, 2, 4 ranks with a
fixed local batch, against P independent 1-rank runs started together on the same
host. The independent runs share the cores, the memory bandwidth and the caches
exactly as the ranks do, but exchange nothing: the ratio separates the trainer's
own overhead (gather, reduce-scatter, all-reduce, waiting for the slowest rank)
from the cost of cores being shared.

    cargo build --release -p contrast-benches --bins
    python3 benches/weak_scaling.py [--local 128] [--ranks 1,2,4] [--steps 8]

Printed per P: the job's samples/s (median over the steps after the first two), the
sum of the independent runs' samples/s, and their ratio (1.00 = the exchange is
free). P above the host's cores is oversubscribed and marked.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "target/release/step_bench")
MPIRUN = os.path.join(ROOT, "launch/mpirun.sh")


def rate(out, batch):
    with open(os.path.join(out, "ours.json")) as f:
        seconds = json.load(f)["seconds"]
    return batch / statistics.median(seconds[2:] or seconds)


def start(ranks, batch, steps, out):
    os.makedirs(out, exist_ok=True)
    cmd = [MPIRUN, "-n", str(ranks), BENCH, "--global-batch", str(batch), "--steps", str(steps), "--out", out]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local", type=int, default=128)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    print(f"weak scaling, SimCLR step (configs/simclr.yaml's model), local batch {args.local}, "
          f"one thread per rank, {cores} cores")
    print(f"{'P':>3} {'job samples/s':>14} {'P solo runs':>12} {'ratio':>6}")
    with tempfile.TemporaryDirectory(prefix="contrast-weak-") as tmp:
        for p in [int(x) for x in args.ranks.split(",")]:
            job = os.path.join(tmp, f"job{p}")
            if start(p, p * args.local, args.steps, job).wait() != 0:
                print(f"{p:>3} the job failed")
                continue
            solos = [os.path.join(tmp, f"solo{p}-{k}") for k in range(p)]
            procs = [start(1, args.local, args.steps, d) for d in solos]
            if any(proc.wait() != 0 for proc in procs):
                print(f"{p:>3} a solo run failed")
                continue
            ours = rate(job, p * args.local)
            alone = sum(rate(d, args.local) for d in solos)
            mark = "  (oversubscribed)" if p > cores else ""
            print(f"{p:>3} {ours:>14.0f} {alone:>12.0f} {ours / alone:>6.2f}{mark}")


if __name__ == "__main__":
    main()
