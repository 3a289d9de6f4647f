"""Build an LFW training folder whose people never occur in the LFW View 1 pair lists.

Usage (after the shared data was unpacked, e.g. by `cargo xtask test` or a run with an ORL/LFW target):
    python3 data-scripts/lfw_disjoint_subset.py [--exclude view1|devtest] [--min-images 2] \
        [--lfw target/shared-data/lfw_gray_112] [--view1 target/shared-data/lfw_view1] \
        [--out target/lfw-disjoint]

--exclude view1 (default) leaves out every person of pairsDevTrain.txt and pairsDevTest.txt (317
people with 2+ images); --exclude devtest leaves out only the people of pairsDevTest.txt, the pairs a
model is verified on (1,262 people with 2+ images, 6,968 images; the one-hour recipe trains on it,
into target/lfw-devtest-disjoint by default).

The output holds one symbolic link per identity (no image is copied), so `[data] type = "image_folder"`
can train on it while View 1's pairsDevTest.txt stays identity-disjoint for verification.
"""
import argparse
import os


def view1_people(view1, lists):
    people = set()
    for name in lists:
        with open(os.path.join(view1, name)) as f:
            for line in f.read().splitlines()[1:]:
                t = line.split()
                if len(t) == 3:
                    people.add(t[0])
                elif len(t) == 4:
                    people.update((t[0], t[2]))
    return people


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lfw", default="target/shared-data/lfw_gray_112")
    ap.add_argument("--view1", default="target/shared-data/lfw_view1")
    ap.add_argument("--exclude", choices=("view1", "devtest"), default="view1")
    ap.add_argument("--out", default=None, help="default target/lfw-disjoint (view1) or target/lfw-devtest-disjoint (devtest)")
    ap.add_argument("--min-images", type=int, default=2)
    a = ap.parse_args()
    lists = ("pairsDevTrain.txt", "pairsDevTest.txt") if a.exclude == "view1" else ("pairsDevTest.txt",)
    out = a.out or ("target/lfw-disjoint" if a.exclude == "view1" else "target/lfw-devtest-disjoint")
    excluded = view1_people(a.view1, lists)
    os.makedirs(out, exist_ok=True)
    chosen = {}
    for name in sorted(os.listdir(a.lfw)):
        n = len(os.listdir(os.path.join(a.lfw, name)))
        if name not in excluded and n >= a.min_images:
            chosen[name] = n
    # The folder holds only this script's links: a link left by a run with other options is
    # removed (a stale identity would otherwise be trained on); anything else is refused.
    for entry in os.listdir(out):
        path = os.path.join(out, entry)
        if not os.path.islink(path):
            raise SystemExit(f"{path}: not a symbolic link made by this script; choose another --out")
        if entry not in chosen:
            os.remove(path)
    for name in chosen:
        link = os.path.join(out, name)
        target = os.path.abspath(os.path.join(a.lfw, name))
        if os.path.lexists(link) and os.readlink(link) != target:
            os.remove(link)
        if not os.path.lexists(link):
            os.symlink(target, link)
    print(f"{len(chosen)} identities, {sum(chosen.values())} images in {out}; "
          f"{len(excluded)} people of {', '.join(lists)} excluded")


if __name__ == "__main__":
    main()
