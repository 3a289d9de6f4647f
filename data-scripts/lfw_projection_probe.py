"""Does a linear projection fitted on the training people's embeddings help verification of unseen people?

A probe (docs/results.md, ninth session), not part of any recipe. It reads two `facerec embed` outputs
(`--flip-sum --no-normalise`): the training folder and the images of a pair list, then verifies the pair
list with cosine similarity after each projection, fitted on the training embeddings only:
  - none: the embeddings as the trainer verifies them;
  - PCA whitening of the L2-normalised, centred training embeddings (k dimensions, eigenvalues^-p/2);
  - WCCN: whitening of the within-class covariance, regularised by lam * mean eigenvalue;
  - LDA: WCCN followed by the top k directions of the between-class covariance.
Accuracy: the LFW View 1 rule of facerec's `LfwPairs` (fold f holds the f-th tenth of the matched and
of the mismatched pairs), the threshold chosen on the other nine folds among the scores themselves.

Usage:
    facerec embed --model RUN --input target/lfw-devtest-disjoint --out train.npy --flip-sum --no-normalise
    facerec embed --model RUN --input test.list --out test.npy --flip-sum --no-normalise
    python data-scripts/lfw_projection_probe.py train test target/shared-data/lfw_view1/pairsDevTest.txt
(`test.list`: one image path of the pair list per line; torch is the only dependency.)
"""
import ast
import csv
import struct
import sys

import torch


def load(prefix):
    """float64 [N, D] from FILE.npy (float32, C order) and the paths and labels of FILE.csv."""
    raw = open(prefix + ".npy", "rb").read()
    header_len = struct.unpack("<H", raw[8:10])[0]
    shape = ast.literal_eval(raw[10:10 + header_len].decode())["shape"]
    x = torch.frombuffer(bytearray(raw[10 + header_len:]), dtype=torch.float32).reshape(shape)
    rows = list(csv.DictReader(open(prefix + ".csv")))
    return x.double(), [r["path"] for r in rows], [r["label"] for r in rows]


def tenths(n, k=10):
    bounds = [n * i // k for i in range(k + 1)]
    return list(zip(bounds, bounds[1:]))


def pairs_with_folds(path):
    matched, mismatched = [], []
    for line in open(path).read().split("\n")[1:]:
        f = line.split()
        if len(f) == 3:
            matched.append((f"{f[0]}_{int(f[1]):04d}.png", f"{f[0]}_{int(f[2]):04d}.png"))
        elif len(f) == 4:
            mismatched.append((f"{f[0]}_{int(f[1]):04d}.png", f"{f[2]}_{int(f[3]):04d}.png"))
    out = []
    for fold, ((a, b), (c, d)) in enumerate(zip(tenths(len(matched)), tenths(len(mismatched)))):
        out += [(p, 1, fold) for p in matched[a:b]] + [(p, 0, fold) for p in mismatched[c:d]]
    return out


def accuracy(score, same, fold):
    accs = []
    for f in range(10):
        fit = fold != f
        s, y = score[fit], same[fit]
        best = max(torch.sort(s).values.tolist(), key=lambda t: ((s >= t).long() == y).double().mean().item())
        accs.append(((score[~fit] >= best).long() == same[~fit]).double().mean().item())
    a = torch.tensor(accs)
    return a.mean().item(), a.std().item()


def main(train_prefix, test_prefix, pairs_path):
    train, _, labels = load(train_prefix)
    test, paths, _ = load(test_prefix)
    row = {p.split("/")[-1]: i for i, p in enumerate(paths)}
    pairs = pairs_with_folds(pairs_path)
    i = torch.tensor([row[a] for (a, _), _, _ in pairs])
    j = torch.tensor([row[b] for (_, b), _, _ in pairs])
    same = torch.tensor([s for _, s, _ in pairs])
    fold = torch.tensor([f for _, _, f in pairs])

    def normalise(x):
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def report(name, z):
        z = normalise(z)
        mean, std = accuracy((z[i] * z[j]).sum(1), same, fold)
        print(f"{name:28s} {mean:.4f} ± {std:.4f}")

    report("none", test)
    classes = {c: k for k, c in enumerate(sorted(set(labels)))}
    y = torch.tensor([classes[c] for c in labels])
    x = normalise(train)
    mu = x.mean(0)
    xc, tc = x - mu, normalise(test) - mu
    ev, vec = torch.linalg.eigh(xc.T @ xc / len(xc))
    ev, vec = ev.flip(0), vec.flip(1)
    for k in (64, 128):
        for p in (0.5, 1.0):
            report(f"pca-whiten k={k} p={p}", tc @ (vec[:, :k] / ev[:k].clamp_min(1e-9) ** (p / 2)))
    count = torch.bincount(y).double()[:, None]
    means = torch.zeros(len(classes), x.shape[1], dtype=x.dtype).index_add_(0, y, xc) / count
    within = (xc - means[y]).T @ (xc - means[y]) / len(xc)
    between = (means * count).T @ means / len(xc)
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    for lam in (1e-4, 1e-3, 1e-2, 1e-1):
        e, v = torch.linalg.eigh(within + lam * torch.trace(within) / x.shape[1] * eye)
        whiten = v / e.sqrt()
        report(f"wccn lam={lam}", tc @ whiten)
        _, v2 = torch.linalg.eigh(whiten.T @ between @ whiten)
        report(f"lda lam={lam} k=64", tc @ (whiten @ v2.flip(1)[:, :64]))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
