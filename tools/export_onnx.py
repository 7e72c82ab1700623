#!/usr/bin/env python3
"""Write the image features of a `trainer export` file (a convnet SimCLR or CLIP model) as ONNX.

    .venv/bin/python tools/export_onnx.py simclr.safetensors simclr.onnx [--size 28]

The graph takes `images` `[batch, C, H, W]` (normalised as the trainer's
evaluation feeds them; see `contrast_torch.fashion_mnist_input`) and returns
`features` `[batch, embed_dim]`, the backbone's L2-normalised output (what
`trainer embed` writes), with a dynamic batch axis; the channels come from
the weights and the image side is fixed at `--size`. The model comes from
`tools/contrast_torch.py`, the PyTorch mirror of the trainer's modules.
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contrast_torch  # noqa: E402


class Features(torch.nn.Module):
    """The model's `features` as a module's forward, for the exporter."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.features(images)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="a `trainer export` safetensors file")
    parser.add_argument("out", type=Path, help="the ONNX file to write")
    parser.add_argument("--size", type=int, default=28, help="image side of the example input")
    parser.add_argument("--opset", type=int, default=18)
    args = parser.parse_args()
    model = contrast_torch.load_export(args.export)
    model.backbone.explicit_pool = True
    channels = model.backbone.conv0.in_channels
    example = torch.zeros(2, channels, args.size, args.size)
    # The image side is fixed in the graph (the pooling bins are computed from it): say so once, not per op.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.onnx.export(
        Features(model).eval(),
        (example,),
        str(args.out),
        input_names=["images"],
        output_names=["features"],
        dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
        opset_version=args.opset,
        dynamo=False,
    )
    print(f"{args.export} -> {args.out} (images [batch, {channels}, {args.size}, {args.size}] -> features)")


if __name__ == "__main__":
    main()
