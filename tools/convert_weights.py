"""Turn PyTorch weight files into safetensors for `model.pretrained`.

    .venv/bin/python tools/convert_weights.py IN OUT.safetensors [--trust] [--key state_dict]

IN may be
- a torchvision or timm `.pth` / `.pt` state dict;
- an open_clip checkpoint (`{"state_dict": ...}` or a bare state dict, with or
  without a `module.` prefix);
- a Lightning `.ckpt` (solo-learn, lightly): its `state_dict`, whose keys carry
  the module's prefix (`backbone.`) — give `model.pretrained_prefix` or keep it
  and use `model.pretrained_format: contrast`;
- an OpenAI CLIP TorchScript archive (`ViT-B-32.pt`): its state dict.

Files are read with `torch.load(weights_only=True)`, which refuses pickled
code; `--trust` lifts that for files you trust (old Lightning checkpoints hold
hyper-parameter objects). Tensors are written contiguous, in their own dtype;
`num_batches_tracked` and non-tensor entries are dropped. The trainer reads the
result; the names are mapped there (docs/config.md, `model.pretrained_format`).
"""
import argparse
import sys

import torch
from safetensors.torch import save_file


def load(path, trust):
    try:
        return torch.jit.load(path, map_location="cpu").state_dict()
    except (RuntimeError, ValueError):
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001 - the message says what to do
        if not trust:
            sys.exit(f"{path}: {e}\n(the file holds more than tensors: if you trust it, add --trust)")
        raise


def state_dict(obj, key):
    if key:
        obj = obj[key]
    elif isinstance(obj, dict):
        for k in ("state_dict", "model", "model_state_dict", "module"):
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict):
        sys.exit(f"no state dict found (a {type(obj).__name__}); name its key with --key")
    out = {}
    for name, t in obj.items():
        if not torch.is_tensor(t) or name.endswith("num_batches_tracked"):
            continue
        out[name.removeprefix("module.")] = t.detach().contiguous()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--trust", action="store_true", help="allow pickled objects (only for files you trust)")
    p.add_argument("--key", help="the entry that holds the state dict (default: state_dict, model, … or the file)")
    a = p.parse_args()
    sd = state_dict(load(a.input, a.trust), a.key)
    if not sd:
        sys.exit(f"{a.input}: no tensors")
    save_file(sd, a.output, metadata={"format": "pt", "source": a.input.rsplit("/", 1)[-1]})
    print(f"{a.output}: {len(sd)} tensors")


if __name__ == "__main__":
    main()
