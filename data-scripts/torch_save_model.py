#!/usr/bin/env python3
"""Writes a backbone with torch.save, as arcface_torch saves its weights, for crates/trainer's
`.pt` tests (facerec reads the file without Python).

Reads one JSON request on stdin:
  {"model": {<[model] table>}, "out": "W.pt", "input": "X.npz", "emb": "E.npz",
   "wrap": null | "module" | "checkpoint", "seed": int}
builds the independent oracle network (backbone_oracle.py / vit_oracle.py) with random weights
and moved BatchNorm buffers, saves its state_dict to `out` (`wrap = "module"`: keys prefixed
`module.` as DistributedDataParallel saves them; `"checkpoint"`: arcface_torch's training
checkpoint dict with `state_dict_backbone`, `epoch`, `global_step`), and writes the float32
eval-mode embedding of X.npz["input"] as E.npz["embedding"].
  {"bad": "not_a_state_dict" | "a_module", "out": "W.pt"} writes a file that is not a state dict.
"""
import json
import sys

import numpy as np
import torch

import backbone_oracle


def main():
    req = json.load(sys.stdin)
    if "bad" in req:
        if req["bad"] == "not_a_state_dict":
            torch.save({"epoch": 3, "lr": 0.1}, req["out"])
        else:
            torch.save(torch.nn.Linear(2, 2), req["out"])
        return
    torch.manual_seed(req.get("seed", 0))
    model = backbone_oracle.build_from_model_table(req["model"])
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                t.copy_(torch.randn_like(t) * 0.1)
    model.eval()
    sd = model.state_dict()
    if req.get("wrap") == "module":
        sd = {"module." + k: v for k, v in sd.items()}
    elif req.get("wrap") == "checkpoint":
        sd = {"epoch": 2, "global_step": 100, "state_dict_backbone": sd}
    torch.save(sd, req["out"])
    x = torch.from_numpy(np.load(req["input"])["input"]).float()
    with torch.no_grad():
        emb = model(x)
    np.savez(req["emb"], embedding=emb.numpy())


if __name__ == "__main__":
    main()
