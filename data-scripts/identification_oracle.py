#!/usr/bin/env python3
"""Independent oracle for facerec-evaluation's 1:N identification metrics
(crates/evaluation/src/identification.rs, docs/evaluation.md "1:N identification"), torch + numpy.

Written from the definitions, by another route than the Rust code:
- gallery templates: per identity the mean of the L2-normalised image embeddings, L2-normalised
  (torch, float64); probes L2-normalised; scores = cosine (matrix product);
- rank of a mated probe: position of the mate in the stably sorted (descending) score row, plus one;
- threshold at FPIR f: the smallest candidate t (every non-mated best score, and -inf) for which the
  fraction of non-mated best scores strictly above t is <= f (a search, not an order statistic);
- TPIR: mated probes whose top-1 gallery entry is the mate and whose mate score is > t.

Usage: identification_oracle.py < request.json > answer.json
request = {"gallery_emb": [[...]], "gallery_labels": [...], "probe_emb": [[...]],
           "probe_labels": [...], "ranks": [...], "fpirs": [...]}
answer  = {"gallery": G, "mated": M, "non_mated": N, "cmc": [...], "threshold": [...],
           "achieved_fpir": [...], "tpir": [...]}   (a threshold of -inf is written as null)
"""
import json
import math
import sys

import numpy as np
import torch


def main():
    req = json.load(sys.stdin)
    ge = torch.tensor(req["gallery_emb"], dtype=torch.float64)
    pe = torch.tensor(req["probe_emb"], dtype=torch.float64)
    gl, pl = req["gallery_labels"], req["probe_labels"]
    ge = torch.nn.functional.normalize(ge, dim=1)
    ids = list(dict.fromkeys(gl))
    templ = torch.stack([ge[[i for i, l in enumerate(gl) if l == name]].mean(0) for name in ids])
    templ = torch.nn.functional.normalize(templ, dim=1)
    pe = torch.nn.functional.normalize(pe, dim=1)
    scores = (pe @ templ.T).numpy()
    where = {name: j for j, name in enumerate(ids)}
    ranks, mate_scores, top1_is_mate, best_non = [], [], [], []
    for row, label in zip(scores, pl):
        if label in where:
            m = where[label]
            order = np.argsort(-row, kind="stable")
            ranks.append(int(np.nonzero(order == m)[0][0]) + 1)
            mate_scores.append(row[m])
            top1_is_mate.append(order[0] == m)
        else:
            best_non.append(row.max())
    ranks, mate_scores = np.array(ranks), np.array(mate_scores)
    top1_is_mate, best_non = np.array(top1_is_mate, dtype=bool), np.array(best_non)
    cmc = [float(np.mean(ranks <= k)) for k in req["ranks"]]
    thr, ach, tpir = [], [], []
    candidates = np.concatenate([[-math.inf], best_non])
    for f in req["fpirs"]:
        ok = [t for t in candidates if np.mean(best_non > t) <= f]
        t = min(ok)
        thr.append(None if t == -math.inf else float(t))
        ach.append(float(np.mean(best_non > t)))
        tpir.append(float(np.mean(top1_is_mate & (mate_scores > t))))
    json.dump({"gallery": len(ids), "mated": int(len(ranks)), "non_mated": int(len(best_non)),
               "cmc": cmc, "threshold": thr, "achieved_fpir": ach, "tpir": tpir}, sys.stdout)


if __name__ == "__main__":
    main()
