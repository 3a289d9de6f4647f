#!/usr/bin/env python3
"""TorchScript for a facerec backbone (used by `facerec export --format torchscript`). ONNX is
written by the binary itself, in Rust (`facerec export --format onnx`, docs/export.md).

The network is the independent PyTorch definition in backbone_oracle.py (written from SPEC 1(d) and
docs/backbones.md, not from reference code). The weights come from a facerec `.safetensors` with
arcface_torch key names; they are checked against the model's state_dict (keys, shapes, dtypes) and
loaded with strict=True, and the model is put in eval mode before it is scripted.

Input of the exported model: float32 [B, 3, S, S] in [-1, 1] ((pixel / 255 - 0.5) / 0.5, RGB),
output: the un-normalised embedding [B, D] (L2-normalise it before cosine comparisons).

Usage:
  export_model.py torchscript (--run-dir DIR | --config config.toml --weights W.safetensors) --out M.pt
--run-dir DIR stands for --config DIR/config.toml --weights DIR/model.safetensors. Only the
`[model]` table of the config is read. Needs torch only.
"""
import argparse
import json
import os
import sys
import tomllib

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backbone_oracle import build_from_model_table, load_exported  # noqa: E402


def load_model(a):
    config = a.config or (a.run_dir and os.path.join(a.run_dir, "config.toml"))
    weights = a.weights or (a.run_dir and os.path.join(a.run_dir, "model.safetensors"))
    if not config or not weights:
        raise SystemExit("give --run-dir, or both --config and --weights")
    with open(config, "rb") as f:
        table = tomllib.load(f)
    if "model" not in table:
        raise SystemExit(f"{config} has no [model] table")
    model = build_from_model_table(table["model"]).float()
    load_exported(model, weights)
    model.eval()
    size = int(table["model"].get("input_size", 112))
    return model, size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["torchscript"])
    ap.add_argument("--run-dir")
    ap.add_argument("--config")
    ap.add_argument("--weights")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model, size = load_model(a)
    # Scripted, not traced: no shape is baked in, so any batch size works.
    scripted = torch.jit.script(model)
    scripted.eval()
    torch.jit.save(scripted, a.out)
    info = {"out": a.out, "format": a.cmd, "input_size": size}
    print(json.dumps(info))


if __name__ == "__main__":
    main()
