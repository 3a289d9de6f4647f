#!/usr/bin/env python3
"""Average the backbone weights of a run's last K checkpoints (a post-hoc probe of weight averaging,
issue 17; not part of the trainer).

Each `<run dir>/checkpoints/step-N/model.safetensors` is read (numpy only: the safetensors layout is
an 8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then
the raw little-endian data). Float tensors, BatchNorm running means and variances included, are
averaged with equal weight; integer tensors (`num_batches_tracked`) are taken from the newest. The
result is written as one `.safetensors` with the same names, shapes and dtypes, which
`facerec eval --model OUT --config <run dir>/config.toml` reads like any exported model.

Usage: weight_average_probe.py RUN_DIR --last K --out avg.safetensors
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "F16": np.float16}


def read(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise SystemExit(f"{path}: tensor {name}: dtype {info['dtype']} not handled")
        lo, hi = info["data_offsets"]
        a = np.frombuffer(data[lo:hi], dtype=np.dtype(DTYPES[info["dtype"]]).newbyteorder("<"))
        out[name] = (info["dtype"], a.reshape(info["shape"]))
    return out


def write(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, (dtype, a) in tensors.items():
        b = np.ascontiguousarray(a, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
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
    states = [read(os.path.join(root, d, "model.safetensors")) for _, d in chosen]
    newest = states[-1]
    avg = {}
    for name, (dtype, a_newest) in newest.items():
        if any(set(s) != set(newest) for s in states):
            raise SystemExit("the checkpoints hold different tensors")
        if dtype.startswith("F"):
            mean = sum(s[name][1].astype(np.float64) for s in states) / len(states)
            avg[name] = (dtype, mean)
        else:
            avg[name] = (dtype, a_newest)
    write(a.out, avg)
    print(json.dumps({"steps": [s for s, _ in chosen], "tensors": len(avg), "out": a.out}))


if __name__ == "__main__":
    sys.exit(main())
