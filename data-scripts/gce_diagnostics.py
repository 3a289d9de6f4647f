#!/usr/bin/env python3
"""Logit statistics and per-sample gradient weights of ArcFace and GCE on a trained model.

Used by the GCE investigation in docs/gce.md ("Why GCE trailed ArcFace on LFW"). Inputs: the
training images' embeddings written by `facerec embed` (FILE.npy and FILE.csv beside it, whose
`label` column is the identity folder) and the run's classifier.safetensors (one [C, D] weight).
Class indices follow the sorted folder names, as the image-folder source assigns them; the script
prints the training top-1 accuracy of argmax cosine, which is high only if that mapping is right.

For uniform random batches of B images (seeded) it evaluates, with torch autograd, the loss of
each head on the batch's cosines against all C prototypes and reports:
- the statistics of the target cosine t and of the non-target cosines;
- the norm of the gradient w.r.t. the batch's embeddings (what reaches the backbone);
- how that gradient spreads over the batch: the share of the row with the largest gradient and the
  effective number of rows (sum r)^2 / sum r^2 of the per-row gradient norms r;
- for GCE, the term-2 push on each anchor's non-targets, sigmoid(l_i + g_i), against
  cross-entropy's 1 - p_i (see docs/gce.md).

GCE is computed by data-scripts/gce_oracle.py (`gce_rows`, written from SPEC 5); ArcFace is the
cross-entropy of s*cos(theta + m) at the target (the exact-gradient threshold form) and s*cos
elsewhere.

usage: gce_diagnostics.py EMB.npy CLASSIFIER.safetensors [--batches 20] [--batch-size 64] [--seed 0]
"""
import argparse
import csv
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gce_oracle  # noqa: E402
from backbone_oracle import load_safetensors  # noqa: E402


def recipe(**over):
    cfg = {
        "s": 32.0,
        "m_t": 0.5,
        "target_form": "angular",
        "gradient": "exact",
        "m_n": 0.1,
        "nontarget_form": "angular",
        "out_weight": "inverse_batch",
        "same_class_out": False,
        "term1_weight": 0.5,
        "term2_weight": 0.5,
        "pairwise": {"rate": 0.0, "min_count": 2, "detach": True, "self_pair": "keep_prototype", "seed": 0},
    }
    cfg.update(over)
    return cfg


def arcface_ce(emb, weight, labels, s=32.0, m=0.5):
    x = gce_oracle.normalize(emb)
    w = gce_oracle.normalize(weight)
    cos = (x @ w.T).clamp(-1, 1)
    y = torch.tensor(labels)
    t = cos[torch.arange(len(labels)), y]
    tt = gce_oracle.target_margin(t, {"m_t": m, "target_form": "angular", "gradient": "exact"})
    logits = s * cos.clone()
    logits[torch.arange(len(labels)), y] = s * tt
    return torch.nn.functional.cross_entropy(logits, y)


def natural_key(s):
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("emb")
    ap.add_argument("classifier")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    emb = torch.from_numpy(np.load(a.emb)).double()
    with open(os.path.splitext(a.emb)[0] + ".csv") as f:
        names = [row["label"] for row in csv.DictReader(f)]
    classes = sorted(set(names), key=natural_key)
    index = {c: k for k, c in enumerate(classes)}
    labels_all = [index[n] for n in names]
    (weight,) = load_safetensors(a.classifier).values()
    weight = weight.double()
    assert weight.shape[0] == len(classes), f"{weight.shape[0]} classifier rows, {len(classes)} folders"
    x = gce_oracle.normalize(emb)
    w = gce_oracle.normalize(weight)
    cos = x @ w.T
    y = torch.tensor(labels_all)
    rows = torch.arange(len(y))
    t = cos[rows, y]
    non = cos.clone()
    non[rows, y] = -2
    top_non = non.max(1).values
    non_mask = torch.ones_like(cos, dtype=torch.bool)
    non_mask[rows, y] = False
    stats = {
        "images": len(y),
        "classes": len(classes),
        "train_top1": (cos.argmax(1) == y).double().mean().item(),
        "t_mean": t.mean().item(),
        "t_q05": t.quantile(0.05).item(),
        "t_min": t.min().item(),
        "nontarget_mean": cos[non_mask].mean().item(),
        "nontarget_std": cos[non_mask].std().item(),
        "top_nontarget_mean": top_non.mean().item(),
        "margin_t_minus_top_non_q05": (t - top_non).quantile(0.05).item(),
    }
    heads = {
        "arcface": None,
        "gce_recipe": recipe(),
        "gce_omega0": recipe(out_weight=0.0),
        "gce_out_detached": recipe(out_gradient="detached"),
    }
    g = torch.Generator().manual_seed(a.seed)
    acc = {k: {"grad_norm": [], "top_row_share": [], "eff_rows": [], "loss": []} for k in heads}
    push = {"gce_term2_push": [], "ce_push": []}
    for _ in range(a.batches):
        idx = torch.randperm(len(y), generator=g)[: a.batch_size]
        lab = [labels_all[i] for i in idx]
        for name, cfg in heads.items():
            e = emb[idx].clone().requires_grad_(True)
            wt = weight.clone().requires_grad_(True)
            if cfg is None:
                loss = arcface_ce(e, wt, lab)
            else:
                loss = gce_oracle.gce_rows(e, wt, lab, cfg, {"classes": [], "samples": []})
            (ge,) = torch.autograd.grad(loss, [e])
            r = ge.norm(dim=1)
            acc[name]["loss"].append(loss.item())
            acc[name]["grad_norm"].append(ge.norm().item())
            acc[name]["top_row_share"].append((r.max() / r.sum()).item())
            acc[name]["eff_rows"].append((r.sum() ** 2 / (r**2).sum()).item())
        # Term-2 push on each anchor's non-targets (GCE) against CE's 1 - p (ArcFace logits).
        with torch.no_grad():
            cb = cos[idx]
            yb = torch.tensor(lab)
            cfg = recipe()
            s = cfg["s"]
            tt = gce_oracle.target_margin(cb[torch.arange(len(lab)), yb], cfg)
            nn = gce_oracle.nontarget_margin(cb.clamp(-1, 1), cfg) * s
            nn[torch.arange(len(lab)), yb] = -math.inf
            ell = nn.logsumexp(1)
            om = 1.0 / (len(lab) - 1)
            same = yb.view(-1, 1) == yb.view(1, -1)
            logw = torch.full(same.shape, math.log(om), dtype=cb.dtype).masked_fill(same, -math.inf)
            logw.fill_diagonal_(0.0)
            gterm = (logw + (-s * tt).view(1, -1)).logsumexp(1)
            push["gce_term2_push"].append(torch.sigmoid(ell + gterm).mean().item())
            arc = s * cb.clone()
            arc[torch.arange(len(lab)), yb] = s * tt
            p = arc.softmax(1)[torch.arange(len(lab)), yb]
            push["ce_push"].append((1 - p).mean().item())
    out = {"stats": stats}
    for name, d in acc.items():
        out[name] = {k: float(np.mean(v)) for k, v in d.items()}
    out["push"] = {k: float(np.mean(v)) for k, v in push.items()}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
