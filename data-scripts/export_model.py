#!/usr/bin/env python3
"""Deployment formats for a facerec backbone: TorchScript (used by `facerec export --format
torchscript`) and ONNX (the route documented in docs/export.md).

The network is the independent PyTorch definition in backbone_oracle.py (written from SPEC 1(d) and
docs/backbones.md, not from reference code). The weights come from a facerec `.safetensors` with
arcface_torch key names; they are checked against the model's state_dict (keys, shapes, dtypes) and
loaded with strict=True, and the model is put in eval mode before it is scripted or exported.

Input of the exported model: float32 [B, 3, S, S] in [-1, 1] ((pixel / 255 - 0.5) / 0.5, RGB),
output: the un-normalised embedding [B, D] (L2-normalise it before cosine comparisons).

Usage:
  export_model.py torchscript (--run-dir DIR | --config config.toml --weights W.safetensors) --out M.pt
  export_model.py onnx        (--run-dir DIR | --config config.toml --weights W.safetensors) --out M.onnx
                              [--opset 17] [--check]
--check (onnx): run the written file with onnx's own numpy reference evaluator on a random batch of
4 and fail unless its embeddings equal the PyTorch model's to 1e-5.
--run-dir DIR stands for --config DIR/config.toml --weights DIR/model.safetensors. Only the
`[model]` table of the config is read. The torchscript command needs torch only; the onnx command
needs the `onnx` package beside torch (pip install onnx).
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
    ap.add_argument("cmd", choices=["torchscript", "onnx"])
    ap.add_argument("--run-dir")
    ap.add_argument("--config")
    ap.add_argument("--weights")
    ap.add_argument("--out", required=True)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    model, size = load_model(a)
    if a.cmd == "torchscript":
        # Scripted, not traced: no shape is baked in, so any batch size works.
        scripted = torch.jit.script(model)
        scripted.eval()
        torch.jit.save(scripted, a.out)
    else:
        example = torch.zeros(1, 3, size, size)
        torch.onnx.export(
            model, (example,), a.out, input_names=["input"], output_names=["embedding"],
            dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=a.opset, dynamo=False,
        )
    info = {"out": a.out, "format": a.cmd, "input_size": size}
    if a.cmd == "onnx" and a.check:
        import onnx
        from onnx.reference import ReferenceEvaluator

        onnx.checker.check_model(onnx.load(a.out))
        x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.no_grad():
            want = model(x).numpy()
        got = ReferenceEvaluator(a.out).run(None, {"input": x.numpy()})[0]
        diff = float(abs(got - want).max())
        info["check_max_abs_diff"] = diff
        if not diff <= 1e-5:
            raise SystemExit(f"{a.out}: ONNX reference output differs from PyTorch by {diff:e}")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
