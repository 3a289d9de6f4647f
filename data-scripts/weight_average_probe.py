#!/usr/bin/env python3
"""Average the backbone weights of a run's last K checkpoints (a post-hoc probe of weight averaging,
issue 17; not part of the trainer).

Each `<run dir>/checkpoints/step-N/model.safetensors` is read with backbone_oracle's reader. Float
tensors, BatchNorm running means and variances included, are averaged with equal weight (summed in
float64); integer tensors (`num_batches_tracked`) are taken from the newest. The result is written
as one `.safetensors` with the same names, shapes and dtypes (8-byte little-endian header length,
JSON header, raw little-endian data), which `facerec eval --model OUT --config <run dir>/config.toml`
reads like any exported model.

Usage: weight_average_probe.py RUN_DIR --last K --out avg.safetensors
"""
import argparse
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backbone_oracle import SAFETENSORS_DTYPES, load_safetensors  # noqa: E402

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write(path, tensors):
    """`tensors` (name -> CPU tensor) to `path`, atomically."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(b)],
        }
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--last", type=int, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    root = os.path.join(a.run_dir, "checkpoints")
    steps = sorted(
        (int(d.split("-")[1]), d)
        for d in os.listdir(root)
        if d.startswith("step-") and os.path.exists(os.path.join(root, d, "meta.json"))
    )
    if len(steps) < a.last:
        raise SystemExit(f"{root}: {len(steps)} complete checkpoints, fewer than --last {a.last}")
    chosen = steps[-a.last:]
    states = [load_safetensors(os.path.join(root, d, "model.safetensors")) for _, d in chosen]
    newest = states[-1]
    if any(set(s) != set(newest) for s in states):
        raise SystemExit(f"{root}: the last {a.last} checkpoints hold different tensors")
    avg = {}
    for name, t in newest.items():
        if t.is_floating_point():
            mean = sum(s[name].double() for s in states) / len(states)
            avg[name] = mean.to(t.dtype)
        else:
            avg[name] = t
    write(a.out, avg)
    print(json.dumps({"steps": [s for s, _ in chosen], "tensors": len(avg), "out": a.out}))


if __name__ == "__main__":
    main()
