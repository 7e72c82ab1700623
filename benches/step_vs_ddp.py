#!/usr/bin/env python3
"""A SimCLR (or CLIP) training step, contrast against PyTorch DDP, parity first.

    cargo build --release -p contrast-benches --bin step_bench
    python3 benches/step_vs_ddp.py [--ranks 1,2,4] [--batches 256,4096] [--steps 8] [--method clip | --resnet18]

`--method clip` compares configs/clip.yaml's towers (convnet image tower, 2-layer
text tower over random captions of 48 tokens) under the CLIP loss against
open_clip's ClipLoss(local_loss=True, gather_with_grad=True).

1. Parity: both sides train 10 steps from the same weights on the same batches
   (global batch 256, 2 ranks, float64); the losses must agree to 1e-4 relative,
   or the benchmark stops. In float32 the two agree to 1e-6 for the first steps,
   then rounding differences, amplified by Adam's normalised updates, grow about
   fivefold per step; float64 shows that the computations are the same.
2. Speed: for each P and global batch G, both sides run `--steps` steps; printed
   are the wall-clock samples/s (median over the steps after the first two),
   the ratio contrast / PyTorch, and the peak RSS per rank (the largest rank).
   PyTorch runs as shipped (glibc malloc) and, where Debian's libjemalloc2 is
   installed, with jemalloc preloaded (pages kept: the same options contrast
   uses). P above the host's cores is oversubscribed and marked.

The PyTorch side (benches/pytorch_step.py) runs under
`python -m torch.distributed.run` from the venv of launch/setup.sh.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, ".venv/bin/python")
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"


METHOD = ["--method", "simclr"]


def ours(ranks, batch, steps, out, write=False, double=False):
    cmd = [os.path.join(ROOT, "launch/mpirun.sh"), "-n", str(ranks), os.path.join(ROOT, "target/release/step_bench"),
           "--global-batch", str(batch), "--steps", str(steps), "--out", out] + (["--write"] if write else []) + (["--double"] if double else []) + METHOD
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "ours.json")) as f:
        return json.load(f)


def torch_side(ranks, steps, out, preload=False, double=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if preload:
        env.update(LD_PRELOAD=JEMALLOC, MALLOC_CONF=JEMALLOC_CONF)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           os.path.join(ROOT, "benches/pytorch_step.py"), "--dir", out, "--steps", str(steps)] + (["--double"] if double else []) + METHOD
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "torch.json")) as f:
        return json.load(f)


def rate(result, batch):
    timed = result["seconds"][2:] or result["seconds"]
    return batch / statistics.median(timed)


def parity(out, batch=256):
    a = ours(2, batch, 10, out, write=True, double=True)
    b = torch_side(2, 10, out, double=True)
    worst = max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"]))
    print(f"parity, global batch {batch}, 2 ranks, 10 steps, float64: losses")
    print("  contrast:", " ".join(f"{x:.6f}" for x in a["losses"]))
    print("  PyTorch: ", " ".join(f"{x:.6f}" for x in b["losses"]))
    print(f"  largest relative difference {worst:.2e} (limit 1e-4)")
    if not worst <= 1e-4:
        sys.exit("parity failed: the speed figures would compare different computations")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--batches", default="256,4096")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--method", default="simclr", choices=["simclr", "clip"])
    ap.add_argument("--resnet18", action="store_true", help="SimCLR with a group-norm ResNet-18 (CIFAR stem)")
    args = ap.parse_args()
    METHOD[1] = args.method
    if args.resnet18:
        METHOD.append("--resnet18")
    cores = os.cpu_count() or 1
    preload = os.path.exists(JEMALLOC)
    with tempfile.TemporaryDirectory(prefix="contrast-ddp-") as out:
        parity(out, 32 if args.resnet18 else 256)
        name = {"simclr": "SimCLR step, configs/simclr.yaml's model", "clip": "CLIP step, configs/clip.yaml's towers"}
        name = "SimCLR step, group-norm ResNet-18 (CIFAR stem)" if args.resnet18 else name[args.method]
        print(f"\n{name}, one intra-op thread per rank, {cores} cores")
        cols = f"{'P':>3} {'G':>6} {'contrast/s':>10} {'torch/s':>8} {'ratio':>6} {'RSS GiB':>8} {'torch GiB':>9}"
        if preload:
            cols += f" {'torch+je/s':>10} {'ratio':>6} {'GiB':>5}"
        print(cols)
        for p in [int(x) for x in args.ranks.split(",")]:
            for g in [int(x) for x in args.batches.split(",")]:
                a = ours(p, g, args.steps, out, write=True)
                b = torch_side(p, args.steps, out)
                ra, rb = rate(a, g), rate(b, g)
                line = (f"{p:>3} {g:>6} {ra:>10.0f} {rb:>8.0f} {ra / rb:>6.2f} "
                        f"{max(a['peak_rss_bytes']) / 2**30:>8.2f} {max(b['peak_rss_bytes']) / 2**30:>9.2f}")
                if preload:
                    c = torch_side(p, args.steps, out, preload=True)
                    rc = rate(c, g)
                    line += f" {rc:>10.0f} {ra / rc:>6.2f} {max(c['peak_rss_bytes']) / 2**30:>5.2f}"
                print(line + ("  (oversubscribed)" if p > cores else ""))
                sys.stdout.flush()


if __name__ == "__main__":
    main()
