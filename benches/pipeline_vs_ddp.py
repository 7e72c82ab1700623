#!/usr/bin/env python3
"""The whole SimCLR job against PyTorch DDP: configs/simclr.yaml on real
Fashion-MNIST with its default augmentations, data loading included.

    cargo build --release -p trainer
    python3 benches/pipeline_vs_ddp.py [--ranks 2,1] [--batches 256,1024] [--steps 12]

Ours: the trainer itself (`launch/mpirun.sh -n P target/release/trainer --config
configs/simclr.yaml`), wall-clock samples/s of `steps.jsonl` (data wait
included). PyTorch: benches/pytorch_pipeline.py under torch.distributed.run,
torchvision v2 transforms and a DataLoader, as many intra-op threads and data
workers per rank as the trainer's plan gives (cores ÷ P threads; workers the
same, at most 4). Both: median over the steps after the first two, peak RSS of
the largest rank (the DataLoader's worker processes not counted). No parity
check is possible here: the two draw different augmentations, so only speed
is compared; benches/step_vs_ddp.py checks that the steps compute the same.
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


def ours(ranks, batch, steps, out):
    run_dir = os.path.join(out, f"ours-{ranks}-{batch}")
    cmd = [os.path.join(ROOT, "launch/mpirun.sh"), "-n", str(ranks), os.path.join(ROOT, "target/release/trainer"),
           "--config", os.path.join(ROOT, "configs/simclr.yaml")]
    for kv in [f"train.global_batch={batch}", f"train.steps={steps}", "train.log_every=1000", f"checkpoint.dir={run_dir}",
               "checkpoint.every=0", "eval.at_end=false", "train.schedule.warmup_steps=0"]:
        cmd += ["--set", kv]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    with open(os.path.join(run_dir, "steps.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return statistics.median(r["samples_per_s"] for r in rows[2:]), rows[-1]["peak_rss_bytes"]


def torch_side(ranks, batch, steps, out, cores):
    share = max(1, cores // ranks)
    path = os.path.join(out, "torch.json")
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           os.path.join(ROOT, "benches/pytorch_pipeline.py"), "--out", path, "--global-batch", str(batch),
           "--steps", str(steps), "--threads", str(share), "--workers", str(min(share, 4))]
    env = dict(os.environ, OMP_NUM_THREADS=str(share))
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
    with open(path) as f:
        r = json.load(f)
    return batch / statistics.median(r["seconds"][2:]), max(r["peak_rss_bytes"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,1")
    ap.add_argument("--batches", default="256,1024")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    print(f"configs/simclr.yaml end to end on Fashion-MNIST, {cores} cores; median of steps 3..{args.steps}")
    print(f"{'P':>3} {'G':>6} {'contrast/s':>10} {'torch/s':>8} {'ratio':>6} {'RSS GiB':>8} {'torch GiB':>9}")
    with tempfile.TemporaryDirectory(prefix="contrast-pipeline-") as out:
        for p in [int(x) for x in args.ranks.split(",")]:
            for g in [int(x) for x in args.batches.split(",")]:
                ra, ma = ours(p, g, args.steps, out)
                rb, mb = torch_side(p, g, args.steps, out, cores)
                print(f"{p:>3} {g:>6} {ra:>10.0f} {rb:>8.0f} {ra / rb:>6.2f} {ma / 2**30:>8.2f} {mb / 2**30:>9.2f}")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
