#!/usr/bin/env python3
"""Turn contrast run directories into TensorBoard event files.

    .venv/bin/python tools/to_tensorboard.py runs/simclr runs/mocov2 --out tb
    .venv/bin/tensorboard --logdir tb

Each run gets a subfolder of --out named after its directory (a numbered
suffix when two runs share a name), so a sweep's runs overlay in one
TensorBoard. From `steps.jsonl`: every numeric field of a step as
`train/<field>` (loss, lr, samples_per_s, grad_norm, embedding_std, ...) and
the per-phase seconds as `phase/<phase>`; from `evals.jsonl`: every figure of
an evaluation as `eval/<figure>` (knn_top1, linear_top1, ...); the run's
`config.yaml` as the text `config`. A rerun rewrites the run's subfolder.
Needs `tensorboard` (launch/setup.sh installs it into the project's venv).
"""

import argparse
import json
import math
import shutil
import sys
from pathlib import Path


def records(path):
    """The JSON objects of a JSON-lines file (none when it is missing)."""
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{number}: not JSON ({e})")
    return out


def scalars(prefix, record):
    """(tag, value) of every finite number of a record; nested objects under their key."""
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            yield from scalars("phase" if key == "phase_s" else f"{prefix}/{key}", value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield f"{prefix}/{key}", float(value)


def convert(run, out, writer_class):
    """Write run directory `run`'s records into event files under `out`."""
    steps, evals = records(run / "steps.jsonl"), records(run / "evals.jsonl")
    if not steps and not evals:
        sys.exit(f"{run}: no steps.jsonl or evals.jsonl (not a run directory?)")
    if out.exists():
        shutil.rmtree(out)
    writer = writer_class(log_dir=str(out))
    for record in steps:
        for tag, value in scalars("train", record):
            writer.add_scalar(tag, value, record["step"])
    for record in evals:
        for tag, value in scalars("eval", record):
            writer.add_scalar(tag, value, record["step"])
    config = run / "config.yaml"
    if config.is_file():
        writer.add_text("config", "```yaml\n" + config.read_text() + "\n```", 0)
    writer.close()
    return len(steps), len(evals)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (checkpoint.dir)")
    parser.add_argument("--out", required=True, type=Path, help="the TensorBoard log directory to write")
    args = parser.parse_args()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        sys.exit(f"needs torch and tensorboard (launch/setup.sh installs them into .venv): {e}")
    names = {}
    for run in args.runs:
        name = run.resolve().name or "run"
        names[name] = names.get(name, 0) + 1
        sub = name if names[name] == 1 else f"{name}-{names[name]}"
        n_steps, n_evals = convert(run, args.out / sub, SummaryWriter)
        print(f"{run}: {n_steps} steps, {n_evals} evaluations -> {args.out / sub}")


if __name__ == "__main__":
    main()
