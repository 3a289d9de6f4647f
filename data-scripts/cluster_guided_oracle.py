#!/usr/bin/env python3
"""Independent oracle for facerec-clustering's cluster-guided pieces (our reading of SPEC section 4,
docs/cluster-guided.md), torch autograd in float64.

Written from the formulas, the straightforward way: the margin head applies acos/cos to the whole
[B, C] matrix with a per-row margin and a one-hot mask; the supervised contrastive clustering and
alignment losses loop over samples / classes; per-identity statistics use dense similarity matrices,
a breadth-first search for the threshold components and a full sort for the k nearest neighbours.

Usage: cluster_guided_oracle.py < request.json > answer.json
request = {
  "head":  [{"cos": [[..]], "labels": [..], "margins": [..] (per class), "s": f, "mode": "exact"|"easy_margin"|"detached"}],
  "scc":   [{"emb": [[..]], "labels": [..], "centres": [[..]], "valid": [..], "scale": f, "extra": [..]}],
  "align": [{"weight": [[..]], "labels": [..], "centres": [[..]], "valid": [..]}],
  "stats": [{"emb": [[..]], "labels": [..], "num_classes": int, "tau": f | null, "hardness": "knn_purity"|"dominant_fraction"|"mean_cosine", "k": int}],
  "margins": [{"hardness": [f | null], "m0", "slope", "m_min", "m_max", "sign": "harder_larger"|"harder_smaller"}],
  "reimprint": [{"weight": [[..]], "centres": [[..]], "valid": [..], "beta": f, "norm": "unit"|"keep"}],
}
answer: per list, {"loss", "grad_cos"} / {"loss", "grad_emb"} / {"loss", "grad_weight"} /
        {"centres", "hardness" (null for unseen), "dominant"} / {"margins"} / {"weight"} (flattened).
"""
import json
import math
import sys

import torch

COS_EPS = 1e-7
D = torch.float64


def flat(t):
    return t.detach().reshape(-1).tolist()


def head(c):
    cos = torch.tensor(c["cos"], dtype=D, requires_grad=True)
    labels = torch.tensor(c["labels"])
    m = torch.tensor(c["margins"], dtype=D)[labels][:, None]  # per-row margin
    s, mode = c["s"], c["mode"]
    theta = torch.acos(cos.clamp(-1 + COS_EPS, 1 - COS_EPS))
    phi = torch.cos(theta + m)
    if mode == "exact":
        phi = torch.where(cos > torch.cos(math.pi - m), phi, cos - m * torch.sin(m))
    elif mode == "easy_margin":
        phi = torch.where(cos > 0, phi, cos)
    elif mode == "detached":
        phi = cos + (phi - cos).detach()
    oh = torch.nn.functional.one_hot(labels, cos.shape[1]).bool()
    z = s * torch.where(oh, phi, cos)
    loss = torch.nn.functional.cross_entropy(z, labels)
    (g,) = torch.autograd.grad(loss, cos)
    return {"loss": loss.item(), "grad_cos": flat(g)}


def unit(v):
    return v / v.norm().clamp_min(1e-12)


def scc(c):
    emb = torch.tensor(c["emb"], dtype=D, requires_grad=True)
    labels = c["labels"]
    mu = torch.tensor(c["centres"], dtype=D)
    valid = [v > 0.5 for v in c["valid"]]
    cand = sorted({l for l in labels + c.get("extra", []) if valid[l]})
    terms = []
    for i, y in enumerate(labels):
        if not valid[y]:
            continue
        x = unit(emb[i])
        logits = torch.stack([c["scale"] * torch.dot(x, mu[k]) for k in cand])
        terms.append(-(logits[cand.index(y)] - torch.logsumexp(logits, 0)))
    loss = torch.stack(terms).mean() if terms else emb.sum() * 0
    (g,) = torch.autograd.grad(loss, emb)
    return {"loss": loss.item(), "grad_emb": flat(g)}


def align(c):
    w = torch.tensor(c["weight"], dtype=D, requires_grad=True)
    mu = torch.tensor(c["centres"], dtype=D)
    cls = sorted({l for l in c["labels"] if c["valid"][l] > 0.5})
    terms = [1 - torch.dot(unit(w[k]), mu[k]) for k in cls]
    loss = torch.stack(terms).mean() if terms else w.sum() * 0
    (g,) = torch.autograd.grad(loss, w)
    return {"loss": loss.item(), "grad_weight": flat(g)}


def stats(c):
    x = torch.tensor(c["emb"], dtype=D)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = c["labels"]
    nc_total, tau = c["num_classes"], c["tau"]
    n, d = x.shape
    centres = torch.zeros(nc_total, d, dtype=D)
    dominant, meancos = [0] * nc_total, [None] * nc_total
    for cl in range(nc_total):
        idx = [i for i in range(n) if labels[i] == cl]
        if not idx:
            continue
        rows = x[idx]
        if tau is None or len(idx) < 2:
            keep = list(range(len(idx)))
        else:
            sim = rows @ rows.T
            seen, comps = set(), []
            for start in range(len(idx)):  # components in order of their smallest member
                if start in seen:
                    continue
                comp, queue = [], [start]
                seen.add(start)
                while queue:
                    a = queue.pop()
                    comp.append(a)
                    for b in range(len(idx)):
                        if b not in seen and b != a and sim[a, b] >= tau:
                            seen.add(b)
                            queue.append(b)
                comps.append(sorted(comp))
            keep = max(comps, key=len)  # max() keeps the first of equal sizes
        mu = unit(rows[keep].sum(0))
        centres[cl] = mu
        dominant[cl] = len(keep)
        meancos[cl] = (rows @ mu).mean().item()
    sizes = [sum(1 for l in labels if l == cl) for cl in range(nc_total)]
    kind = c["hardness"]
    if kind == "dominant_fraction":
        h = [None if sizes[i] == 0 else 1 - dominant[i] / sizes[i] for i in range(nc_total)]
    elif kind == "mean_cosine":
        h = [None if m is None else 1 - m for m in meancos]
    else:
        k = min(c["k"], n - 1)
        sim = x @ x.T
        sim.fill_diagonal_(-math.inf)
        pure = [0] * nc_total
        for i in range(n):
            nb = torch.argsort(sim[i], descending=True)[:k].tolist()
            same = sum(1 for j in nb if labels[j] == labels[i])
            if 2 * same > k:
                pure[labels[i]] += 1
        h = [None if sizes[i] == 0 else 1 - pure[i] / sizes[i] for i in range(nc_total)]
    return {"centres": flat(centres), "hardness": h, "dominant": dominant}


def margins(c):
    hs = c["hardness"]
    seen = [h for h in hs if h is not None]
    mean = sum(seen) / len(seen) if seen else 0.0
    sign = 1.0 if c["sign"] == "harder_larger" else -1.0
    out = []
    for h in hs:
        if h is None or c["slope"] == 0:
            out.append(c["m0"])
        else:
            out.append(min(max(c["m0"] + sign * c["slope"] * (h - mean), c["m_min"]), c["m_max"]))
    return {"margins": out}


def reimprint(c):
    w = torch.tensor(c["weight"], dtype=D)
    mu = torch.tensor(c["centres"], dtype=D)
    out = w.clone()
    for k, v in enumerate(c["valid"]):
        if v > 0.5:
            new = unit((1 - c["beta"]) * unit(w[k]) + c["beta"] * mu[k])
            out[k] = new * (w[k].norm() if c["norm"] == "keep" else 1.0)
    return {"weight": flat(out)}


def main():
    req = json.load(sys.stdin)
    fns = {"head": head, "scc": scc, "align": align, "stats": stats, "margins": margins,
           "reimprint": reimprint}
    json.dump({k: [fns[k](c) for c in req.get(k, [])] for k in fns}, sys.stdout)


if __name__ == "__main__":
    main()
