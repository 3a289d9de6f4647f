#!/usr/bin/env python3
"""Independent oracle for the CoReFace contrastive loss (SPEC section 3(b), docs/coreface.md).

Written from the math, deliberately naively: every softmax row is built entry by entry in Python
loops (anchor embedding, candidate embedding, role), each cosine a separate dot product of
normalised vectors, the supervised mask decided per pair from the labels, the hardest negative
found by a Python max, and the cross-entropy written as logsumexp minus the target logit. The Rust
crate builds whole matrices with one matmul and boolean masks; agreement of losses, margins and
gradients checks both.

Protocols (anchor rows):
  one_way   : anchors view-1 images i, candidates view-2 images j (all j).
  both_ways : one_way's rows, then anchors view-2 images i against view-1 candidates.
  two_n     : anchors every embedding of both views, candidates every embedding except itself.
Roles: same image, other view -> positive (logit s*(cos - m)); other image, same label -> masked
(logit 0, a constant); other image, other label -> negative (logit s*cos).
Margin: gap = mean over rows of (positive cos - max over masked-and-negative entries), on detached
values (masked entries count as 0); adaptive "batch": m = mu*gap + (1-mu)*m_prev; "state":
m = mu*m_prev + (1-mu)*gap; fixed: m. m_prev starts at 0 and carries across the steps of a case.
The loss of a step uses the updated m.

Usage: coreface_oracle.py < request.json > answer.json
request = {"cases": [{"protocol", "s", "margin": {"type": "adaptive", "momentum", "momentum_on"} |
                                                 {"type": "fixed", "m"},
                      "steps": [{"v1": [[...]], "v2": [[...]], "labels": [...]}]}]}
answer  = {"cases": [{"steps": [{"loss", "margin", "batch_gap", "grad_v1", "grad_v2"}]}]}
          (gradients flattened row-major)
"""
import json
import sys

import torch


def rows_of(protocol, b):
    """List of (anchor, [candidates]); an embedding is (view, image)."""
    v1 = [(1, i) for i in range(b)]
    v2 = [(2, i) for i in range(b)]
    if protocol == "one_way":
        return [(a, v2) for a in v1]
    if protocol == "both_ways":
        return [(a, v2) for a in v1] + [(a, v1) for a in v2]
    if protocol == "two_n":
        both = v1 + v2
        return [(a, [c for c in both if c != a]) for a in both]
    raise ValueError(protocol)


def unit(x):
    return x / torch.sqrt((x * x).sum())


def step(protocol, s, margin_cfg, m_prev, v1, v2, labels):
    b = len(labels)
    emb = {}
    for i in range(b):
        emb[(1, i)] = unit(v1[i])
        emb[(2, i)] = unit(v2[i])

    def cos(a, c):
        return torch.clamp(torch.dot(emb[a], emb[c]), -1.0, 1.0)

    rows = []  # per row: list of (cos value tensor or constant, is_positive)
    gaps = []
    for a, cands in rows_of(protocol, b):
        entries = []
        for c in cands:
            if c[1] == a[1]:
                entries.append((cos(a, c), True))
            elif labels[c[1]] == labels[a[1]]:
                entries.append((torch.zeros((), dtype=torch.float64), False))
            else:
                entries.append((cos(a, c), False))
        pos = [e.detach().item() for e, p in entries if p]
        neg = [e.detach().item() for e, p in entries if not p]
        assert len(pos) == 1
        gaps.append(pos[0] - max(neg))
        rows.append(entries)
    gap = sum(gaps) / len(gaps)
    if margin_cfg["type"] == "fixed":
        m = margin_cfg["m"]
    else:
        mu = margin_cfg["momentum"]
        if margin_cfg["momentum_on"] == "batch":
            m = mu * gap + (1 - mu) * m_prev
        elif margin_cfg["momentum_on"] == "state":
            m = mu * m_prev + (1 - mu) * gap
        else:
            raise ValueError(margin_cfg)
    total = torch.zeros((), dtype=torch.float64)
    for entries in rows:
        logits = [s * (e - m) if p else s * e for e, p in entries]
        target = [k for k, (_, p) in enumerate(entries) if p][0]
        z = torch.stack(logits)
        total = total + torch.logsumexp(z, 0) - z[target]
    loss = total / len(rows)
    return loss, m, gap


def main():
    req = json.load(sys.stdin)
    out = []
    for case in req["cases"]:
        m_prev = 0.0
        steps = []
        for st in case["steps"]:
            v1 = torch.tensor(st["v1"], dtype=torch.float64, requires_grad=True)
            v2 = torch.tensor(st["v2"], dtype=torch.float64, requires_grad=True)
            loss, m, gap = step(case["protocol"], case["s"], case["margin"], m_prev,
                                v1, v2, st["labels"])
            g1, g2 = torch.autograd.grad(loss, [v1, v2])
            steps.append({
                "loss": loss.item(),
                "margin": m,
                "batch_gap": gap,
                "grad_v1": g1.flatten().tolist(),
                "grad_v2": g2.flatten().tolist(),
            })
            m_prev = m
        out.append({"steps": steps})
    json.dump({"cases": out}, sys.stdout)


if __name__ == "__main__":
    main()
