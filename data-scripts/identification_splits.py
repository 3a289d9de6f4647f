#!/usr/bin/env python3
"""Write the gallery / probe lists of the 1:N measurements in docs/evaluation.md ("1:N identification,
measured"), as `path<TAB>identity` list files that `facerec eval --gallery LIST --probes LIST` reads.

ORL (`--orl DIR`, the unpacked orl_faces): the identities s31..s40 that the ORL recipe never trains on.
Gallery: images 1..5 of s31..s37 (7 identities, one template each = mean of 5 images). Probes:
images 6..10 of s31..s40: 35 mated searches (s31..s37), 15 non-mated (s38..s40).

LFW (`--lfw DIR`, the unpacked lfw_gray_112; `--exclude DIR`, a training folder whose identities are
left out, e.g. target/lfw-disjoint of the lfw-view1 recipe): every remaining person with 2+ images
gives its first image (natural order) to the gallery and the others to the probes (mated); every
image of a person with one image is a non-mated probe.

Usage: identification_splits.py [--orl target/shared-data/orl_faces] [--lfw target/shared-data/lfw_gray_112]
                                [--exclude target/lfw-disjoint] --out DIR
Writes DIR/orl_gallery.txt, DIR/orl_probes.txt, DIR/lfw_gallery.txt, DIR/lfw_probes.txt (absolute paths).
"""
import argparse
import os
import re


def natural(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def write(path, rows):
    with open(path, "w") as f:
        for p, label in rows:
            f.write(f"{os.path.abspath(p)}\t{label}\n")
    print(f"{path}: {len(rows)} images of {len({l for _, l in rows})} identities")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--orl", default="target/shared-data/orl_faces")
    ap.add_argument("--lfw", default="target/shared-data/lfw_gray_112")
    ap.add_argument("--exclude", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if os.path.isdir(a.orl):
        gallery = [(os.path.join(a.orl, f"s{s}", f"{k}.pgm"), f"s{s}") for s in range(31, 38) for k in range(1, 6)]
        probes = [(os.path.join(a.orl, f"s{s}", f"{k}.pgm"), f"s{s}") for s in range(31, 41) for k in range(6, 11)]
        write(os.path.join(a.out, "orl_gallery.txt"), gallery)
        write(os.path.join(a.out, "orl_probes.txt"), probes)
    if os.path.isdir(a.lfw):
        excluded = set(os.listdir(a.exclude)) if a.exclude else set()
        gallery, probes = [], []
        for person in sorted(os.listdir(a.lfw), key=natural):
            if person in excluded:
                continue
            files = sorted(os.listdir(os.path.join(a.lfw, person)), key=natural)
            paths = [os.path.join(a.lfw, person, f) for f in files]
            if len(paths) >= 2:
                gallery.append((paths[0], person))
                probes.extend((p, person) for p in paths[1:])
            else:
                probes.append((paths[0], person))
        write(os.path.join(a.out, "lfw_gallery.txt"), gallery)
        write(os.path.join(a.out, "lfw_probes.txt"), probes)


if __name__ == "__main__":
    main()
