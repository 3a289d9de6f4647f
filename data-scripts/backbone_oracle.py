#!/usr/bin/env python3
"""Independent PyTorch oracle for crates/backbone (facerec).

Written from SPEC 1(d) (iResNet) and from the structural description of arcface_torch's `mbf` in
docs/backbones.md; no reference code was copied. Module attribute names are chosen so that the
state_dict keys are the ones arcface_torch produces.

Usage:
  backbone_oracle.py keys    ARCH_ARGS
      -> JSON {"keys": [[name, [shape...]], ...], "trainable": int, "total": int}
  backbone_oracle.py forward ARCH_ARGS --params P.npz --input X.npz --out OUT.npz
      loads P.npz into the model with strict=True (float64), runs eval(x) then train(x) and writes
      OUT.npz with "eval_out", "train_out" and "state/<key>" for the state_dict after the train pass.
  backbone_oracle.py embed   ARCH_ARGS --weights W.safetensors --input X.npz --out OUT.npz
      reads an exported `.safetensors` (its own reader: torch and numpy only), checks that its keys,
      shapes and dtypes are exactly the model's state_dict (num_batches_tracked: int64 scalars),
      loads it with strict=True in float32, converts the model to float64 and writes the eval-mode
      embeddings of X (computed in float64) as "embedding".

ARCH_ARGS: --arch iresnet (--depth D | --layers a,b,c,d) [--widths ...] [--emb E] [--input-size S]
           --arch mbf [--blocks a,b,c,d] [--scale K] [--emb E] [--input-size S]
"""
import argparse
import json
import math

import numpy as np
import torch
from torch import nn

DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 14, 3], 100: [3, 13, 30, 3], 200: [6, 26, 60, 6]}
EPS = 1e-5


def side_after_four_halvings(s):
    for _ in range(4):
        s = (s + 1) // 2
    return s


# ---------------------------------------------------------------- iResNet (SPEC 1(d))
class Block(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus identity or conv1x1/BN."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=EPS)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout, eps=EPS)
            )

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x
        if self.downsample is not None:
            identity = self.downsample(x)
        return y + identity


class IResNetOracle(nn.Module):
    def __init__(self, blocks, widths, emb, input_size, dropout=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=EPS)
        self.prelu = nn.PReLU(widths[0])
        cin = widths[0]
        for i, (n, cout) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(n):
                stage.append(Block(cin, cout, 2 if j == 0 else 1))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.bn2 = nn.BatchNorm2d(widths[3], eps=EPS)
        self.dropout = nn.Dropout(dropout)
        side = side_after_four_halvings(input_size)
        self.fc = nn.Linear(widths[3] * side * side, emb)
        self.features = nn.BatchNorm1d(emb, eps=EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)

    def forward(self, x):
        # Explicit stage calls (not a getattr loop) so that torch.jit.script accepts the model.
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


# ---------------------------------------------------------------- MobileFaceNet (docs/backbones.md)
class Unit(nn.Module):
    """conv (no bias) -> BN [-> PReLU] held in `layers` (keys layers.0/1/2)."""

    def __init__(self, cin, cout, k=1, stride=1, pad=0, groups=1, act=True):
        super().__init__()
        mods = [nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            mods.append(nn.PReLU(cout))
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, stride, mid, residual):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            Unit(cin, mid), Unit(mid, mid, 3, stride, 1, groups=mid), Unit(mid, cout, act=False)
        )

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


class Repeat(nn.Module):
    def __init__(self, c, n, mid):
        super().__init__()
        self.layers = nn.Sequential(*[Bottleneck(c, c, 1, mid, True) for _ in range(n)])

    def forward(self, x):
        return self.layers(x)


class Head(nn.Module):
    def __init__(self, side, emb):
        super().__init__()
        self.layers = nn.Sequential(
            Unit(512, 512, side, 1, 0, groups=512, act=False),
            nn.Flatten(),
            nn.Linear(512, emb, bias=False),
            nn.BatchNorm1d(emb),
        )

    def forward(self, x):
        return self.layers(x)


class MbfOracle(nn.Module):
    def __init__(self, blocks, scale, emb, input_size):
        super().__init__()
        c1, c2 = 64 * scale, 128 * scale
        first = Unit(c1, c1, 3, 1, 1, groups=64) if blocks[0] == 1 else Repeat(c1, blocks[0], 128)
        self.layers = nn.ModuleList([
            Unit(3, c1, 3, 2, 1), first,
            Bottleneck(c1, c1, 2, 128, False), Repeat(c1, blocks[1], 128),
            Bottleneck(c1, c2, 2, 256, False), Repeat(c2, blocks[2], 256),
            Bottleneck(c2, c2, 2, 512, False), Repeat(c2, blocks[3], 256),
        ])
        self.conv_sep = Unit(c2, 512)
        self.features = Head(side_after_four_halvings(input_size), emb)

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return self.features(self.conv_sep(x))


# ---------------------------------------------------------------- safetensors (no extra package)
# Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}
# (plus an optional "__metadata__"), then the raw little-endian tensor bytes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def load_safetensors(path):
    """name -> CPU tensor, for every tensor in the file."""
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    body = bytearray(data[8 + n:])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = info["shape"]
        if end > begin:
            t = torch.frombuffer(body[begin:end], dtype=dtype)
        else:
            t = torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape).clone()
    return out


def check_state_dict(model, sd, origin):
    """The file must hold exactly the model's state_dict keys, shapes and dtypes."""
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        raise SystemExit(f"{origin}: missing keys {missing}, unexpected keys {unexpected}")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape) or sd[k].dtype != v.dtype:
            raise SystemExit(
                f"{origin}: {k} is {sd[k].dtype} {tuple(sd[k].shape)}, the model has {v.dtype} {tuple(v.shape)}"
            )


def load_exported(model, path):
    """Load an exported float32 `.safetensors` into `model` (strict), after check_state_dict."""
    sd = load_safetensors(path)
    check_state_dict(model, sd, path)
    model.load_state_dict(sd, strict=True)
    return model


def build_from_model_table(t):
    """The oracle model for a config's `[model]` table (as facerec writes it to config.toml)."""
    emb = int(t.get("embedding_size", 512))
    size = int(t.get("input_size", 112))
    if t["type"] == "iresnet":
        blocks = DEPTHS[int(t["depth"])] if "depth" in t else [int(v) for v in t["layers"]]
        widths = [int(v) for v in t.get("widths", [64, 128, 256, 512])]
        return IResNetOracle(blocks, widths, emb, size, float(t.get("dropout", 0.0)))
    if t["type"] == "mobilefacenet":
        blocks = [int(v) for v in t.get("blocks", [1, 4, 6, 2])]
        return MbfOracle(blocks, int(t.get("scale", 2)), emb, size)
    if t["type"] == "vit":
        import vit_oracle  # next to this file

        return vit_oracle.from_model_table(t)
    raise SystemExit(f"unknown model type {t['type']!r}")


# ---------------------------------------------------------------- CLI
def ints(s):
    return [int(v) for v in s.split(",")]


def build(a):
    if a.arch == "iresnet":
        blocks = DEPTHS[a.depth] if a.depth is not None else ints(a.layers)
        return IResNetOracle(blocks, ints(a.widths), a.emb, a.input_size)
    return MbfOracle(ints(a.blocks), a.scale, a.emb, a.input_size)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["keys", "forward", "embed"])
    ap.add_argument("--arch", choices=["iresnet", "mbf"], required=True)
    ap.add_argument("--depth", type=int)
    ap.add_argument("--layers")
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--blocks", default="1,4,6,2")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--emb", type=int, default=512)
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--params")
    ap.add_argument("--input")
    ap.add_argument("--out")
    ap.add_argument("--weights")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = build(a)
    if a.cmd == "keys":
        sd = model.state_dict()
        print(json.dumps({
            "keys": [[k, list(v.shape)] for k, v in sd.items()],
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters()),
        }))
        return
    if a.cmd == "embed":
        # Loaded as float32 (the file's dtypes are checked), then computed in float64 on those
        # values: the answer is then the same on any CPU, and our float32 network is held to it
        # with a float32 tolerance.
        model = load_exported(model, a.weights).double().eval()
        x = torch.from_numpy(np.load(a.input)["input"]).float().double()
        with torch.no_grad():
            emb = model(x)
        np.savez(a.out, embedding=emb.numpy())
        return
    model = model.double()
    params = np.load(a.params)
    sd = {k: torch.from_numpy(params[k]) for k in params.files}
    model.load_state_dict(sd, strict=True)
    x = torch.from_numpy(np.load(a.input)["input"])
    with torch.no_grad():
        model.eval()
        eval_out = model(x)
        model.train()
        train_out = model(x)
    out = {"eval_out": eval_out.numpy(), "train_out": train_out.numpy()}
    out.update({"state/" + k: v.numpy() for k, v in model.state_dict().items()})
    np.savez(a.out, **out)
    assert math.isfinite(float(eval_out.abs().sum()))


if __name__ == "__main__":
    main()
