#!/usr/bin/env python3
"""Independent oracle for the facerec-clustering metrics (docs/clustering.md), numpy only.

Written from the definitions, deliberately not from a contingency table where the Rust code uses one:
- pairwise precision/recall: loop over all item pairs i < j (same cluster? same class?);
- BCubed: per item, |cluster(i) & class(i)| / |cluster(i)| and / |class(i)|, averaged;
- NMI: mutual information from the joint distribution built by numpy, entropies of the marginals,
  normalised by the arithmetic mean (nmi) and the geometric mean (nmi_sqrt).
Conventions (docs/clustering.md): 0/0 ratios are 1; F = 0 when P + R = 0; NMI = 1 when both labelings
are a single cluster, 0 when exactly one is.

Usage: clustering_oracle.py < request.json > answer.json
request = {"cases": [{"pred": [...], "truth": [...]}]}
answer  = {"cases": [{"pairwise_precision", "pairwise_recall", "pairwise_f", "bcubed_precision",
                      "bcubed_recall", "bcubed_f", "nmi", "nmi_sqrt"}]}
"""
import json
import sys

import numpy as np


def ratio(a, b):
    return 1.0 if b == 0 else a / b


def f(p, r):
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def metrics(pred, truth):
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    n = len(pred)
    same_p = pred[:, None] == pred[None, :]
    same_t = truth[:, None] == truth[None, :]
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    tp = int(np.sum(same_p & same_t & upper))
    pp = int(np.sum(same_p & upper))
    tt = int(np.sum(same_t & upper))
    prec, rec = ratio(tp, pp), ratio(tp, tt)
    bp = np.mean([np.sum(same_p[i] & same_t[i]) / np.sum(same_p[i]) for i in range(n)])
    br = np.mean([np.sum(same_p[i] & same_t[i]) / np.sum(same_t[i]) for i in range(n)])
    _, ti = np.unique(truth, return_inverse=True)
    _, pi = np.unique(pred, return_inverse=True)
    joint = np.zeros((ti.max() + 1, pi.max() + 1))
    np.add.at(joint, (ti, pi), 1.0)
    joint /= n
    pu, pv = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float(np.sum(joint[nz] * np.log(joint[nz] / np.outer(pu, pv)[nz])))
    hu = float(-np.sum(pu * np.log(pu)))
    hv = float(-np.sum(pv * np.log(pv)))
    if hu == 0 and hv == 0:
        nmi = nmi_sqrt = 1.0
    elif hu == 0 or hv == 0:
        nmi = nmi_sqrt = 0.0
    else:
        nmi, nmi_sqrt = mi / ((hu + hv) / 2), mi / np.sqrt(hu * hv)
    return {
        "pairwise_precision": prec, "pairwise_recall": rec, "pairwise_f": f(prec, rec),
        "bcubed_precision": float(bp), "bcubed_recall": float(br), "bcubed_f": f(bp, br),
        "nmi": float(nmi), "nmi_sqrt": float(nmi_sqrt),
    }


def main():
    req = json.load(sys.stdin)
    json.dump({"cases": [metrics(c["pred"], c["truth"]) for c in req["cases"]]}, sys.stdout)


if __name__ == "__main__":
    main()
