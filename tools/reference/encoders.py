"""Reference fixtures of the encoders: key contracts and numerical parity.

Writes crates/contrast-nn/tests/assets/encoders.json, which the Rust tests
(crates/contrast-nn/tests/encoders.rs) read:

- "keys": the state-dict names and shapes of the full-size models as the real
  libraries build them (torchvision ResNet-18/34/50, timm ViT-Ti/S/B/16,
  open_clip ViT-B-32), num_batches_tracked left out;
- "cases": small models with closed-form weights (a function of each key's
  rank in sorted order and the element's flat index, see `closed_form`) and
  closed-form inputs, run in float64 in eval mode; each case records its key
  shapes and the sum, sum of squares and a few values of the features.

No weights are downloaded (pretrained=None). Regenerate with

    pip install --target /tmp/ref --no-deps timm==1.0.31 open_clip_torch==3.3.0 \
        safetensors huggingface_hub pyyaml ftfy regex tqdm wcwidth filelock fsspec packaging
    PYTHONPATH=/tmp/ref .venv/bin/python tools/reference/encoders.py

(.venv holds torch 2.13.0 and torchvision 0.28.0; launch/setup.sh makes it).
"""
import json
import math
import pathlib

import open_clip
import timm
import torch
import torchvision

OUT = pathlib.Path(__file__).resolve().parents[2] / "crates/contrast-nn/tests/assets/encoders.json"


def state(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def keys(model):
    return [[k, list(v.shape)] for k, v in sorted(state(model).items())]


def closed_form(name, k, shape):
    """The value of every element of key number `k` (in sorted order)."""
    n = math.prod(shape) if shape else 1
    i = torch.arange(n, dtype=torch.float64)
    base = torch.sin(0.37 * i + 0.91 * k + 0.13)
    if name.endswith("running_var"):
        v = 1.0 + 0.5 * base * base
    elif name.endswith("running_mean"):
        v = 0.1 * base
    elif len(shape) == 1 and name.endswith("weight"):
        v = 1.0 + 0.1 * base
    elif len(shape) == 1 and name.endswith("bias"):
        v = 0.05 * base
    else:
        fan_in = n // shape[0] if shape and shape[0] > 1 else max(n // (shape[-1] if shape else 1), 1)
        v = base * math.sqrt(3.0 / fan_in)
    return v.reshape(shape)


def load_closed_form(model):
    sd = state(model)
    new = {name: closed_form(name, k, list(sd[name].shape)) for k, name in enumerate(sorted(sd))}
    model = model.double()  # first: loading into float32 parameters would round the values
    model.load_state_dict(new, strict=False)
    return model.eval()


def images(b, c, h, w):
    return torch.sin(0.05 * torch.arange(b * c * h * w, dtype=torch.float64)).reshape(b, c, h, w)


def stats(y):
    y = y.detach().double()
    return {"shape": list(y.shape), "sum": y.sum().item(), "sumsq": (y * y).sum().item(),
            "head": y[0, :6].tolist(), "tail": y[-1, -6:].tolist()}


def case(name, model, x, run=None, **extra):
    model = load_closed_form(model)
    with torch.no_grad():
        y = run(model, x) if run else model(x)
    out = {"name": name, "keys": keys(model), "input": list(x.shape), **extra}
    out.update(y if isinstance(y, dict) else {"features": stats(y)})
    return out


def cifar_resnet18():
    m = torchvision.models.resnet18()
    m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = torch.nn.Identity()
    m.fc = torch.nn.Identity()
    return m


def headless(m):
    m.fc = torch.nn.Identity()
    return m


def bn_train_step(model, x):
    """One train-mode forward: the running statistics torchvision's batch norm keeps."""
    model.train()
    model(x)
    sd = model.state_dict()
    names = ["bn1", "layer1.0.bn1", "layer4.1.bn2"]
    return {"running": {n: {"mean": sd[n + ".running_mean"].sum().item(), "var": sd[n + ".running_var"].sum().item()}
                        for n in names}}


def tiny_clip(quick_gelu):
    vision = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 4.0}
    text = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)


def tokens(b, ctx, vocab):
    """Closed-form tokens whose end (the largest id, where open_clip pools) is at 5 + 3·row."""
    t = torch.zeros(b, ctx, dtype=torch.long)
    for r in range(b):
        end = 5 + 3 * r
        t[r, : end + 1] = torch.tensor([(7 * j + 3 * r) % (vocab - 2) + 1 for j in range(end + 1)])
        t[r, end] = vocab - 1
    return t


def clip_run(model, x):
    t = tokens(2, 16, 100)
    return {"image": stats(model.encode_image(x)), "text": stats(model.encode_text(t)), "tokens": t.tolist()}


def main():
    torch.manual_seed(0)
    full = {
        "torchvision_resnet18": torchvision.models.resnet18(),
        "torchvision_resnet34": torchvision.models.resnet34(),
        "torchvision_resnet50": torchvision.models.resnet50(),
        "timm_vit_tiny_patch16_224": timm.create_model("vit_tiny_patch16_224", pretrained=False),
        "timm_vit_small_patch16_224": timm.create_model("vit_small_patch16_224", pretrained=False),
        "timm_vit_base_patch16_224": timm.create_model("vit_base_patch16_224", pretrained=False),
        "open_clip_ViT-B-32": open_clip.create_model("ViT-B-32", pretrained=None),
    }
    vit = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0)
    cases = [
        case("resnet18_cifar_32", cifar_resnet18(), images(2, 3, 32, 32)),
        case("resnet50_imagenet_64", headless(torchvision.models.resnet50()), images(2, 3, 64, 64)),
        case("resnet18_cifar_32_train_step", cifar_resnet18(), images(4, 3, 32, 32), bn_train_step),
        case("vit_2_blocks_cls", timm.models.VisionTransformer(**vit), images(2, 3, 32, 32)),
        case("vit_2_blocks_mean", timm.models.VisionTransformer(**vit, global_pool="avg"), images(2, 3, 32, 32)),
        case("open_clip_gelu", tiny_clip(False), images(2, 3, 32, 32), clip_run),
        case("open_clip_quick_gelu", tiny_clip(True), images(2, 3, 32, 32), clip_run),
    ]
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                "timm": timm.__version__, "open_clip": open_clip.__version__}
    # Full-size forward passes (CONTRAST_FULL_ENCODERS=1 in the Rust tests): one image each.
    full_cases = [
        case("full_resnet50_224", headless(torchvision.models.resnet50()), images(1, 3, 224, 224)),
        case("full_vit_base_224", timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0),
             images(1, 3, 224, 224)),
        case("full_open_clip_vit_b_32", open_clip.create_model("ViT-B-32", pretrained=None), images(1, 3, 224, 224),
             lambda m, x: {"image": stats(m.encode_image(x))}),
    ]
    for c in full_cases:
        del c["keys"]  # the same as "keys" above
    doc = {"versions": versions, "keys": {k: keys(m) for k, m in full.items()}, "cases": cases,
           "full_cases": full_cases}
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", versions)


if __name__ == "__main__":
    main()
