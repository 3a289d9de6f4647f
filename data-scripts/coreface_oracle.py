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
Margin: gap = mean over rows of (positive cos - hardest negative), on detached values (masked
entries count as 0). The hardest negative of a row, "negatives" rule: the max over its masked and
negative entries; "positive_as_zero" rule (the released code): the max over the row's entries with
the positive's own entry written as 0 in that list. Adaptive "batch": m = mu*gap + (1-mu)*m_prev;
"state": m = mu*m_prev + (1-mu)*gap; fixed: m. m_prev starts at 0 and carries across the steps of
a case. The loss of a step uses the updated m.

Gradient accumulation: a step may hold several micro-batches. The step's gap is the mean over
every anchor row of its micro-batches (each row's gap within its own micro-batch); micro-batch k's
loss uses the margin updated from the rows of micro-batches 1..k, and m_prev for the next step is
the margin after the step's last micro-batch. The positive and hardest-negative means are taken
over the same rows.

Usage: coreface_oracle.py < request.json > answer.json
request = {"cases": [{"protocol", "s", "margin": {"type": "adaptive", "momentum", "momentum_on"} |
                                                 {"type": "fixed", "m"},
                      "hardest_negative": "negatives" | "positive_as_zero" (default "negatives"),
                      "steps": [BATCH | {"micro": [BATCH, ...]}]}]}
          BATCH = {"v1": [[...]], "v2": [[...]], "labels": [...]}
answer  = {"cases": [{"steps": [OUT | {"micro": [OUT, ...]}]}]}  (the request's step form)
          OUT = {"loss", "margin", "batch_gap", "positive_cos", "hardest_negative_cos",
                 "grad_v1", "grad_v2"}  (gradients flattened row-major)
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


def micro_batch(protocol, s, margin_cfg, rule, m_prev, step_rows, v1, v2, labels):
    """One micro-batch; `step_rows` collects (gap, positive, hardest) of the step's rows so far."""
    b = len(labels)
    emb = {}
    for i in range(b):
        emb[(1, i)] = unit(v1[i])
        emb[(2, i)] = unit(v2[i])

    def cos(a, c):
        return torch.clamp(torch.dot(emb[a], emb[c]), -1.0, 1.0)

    rows = []  # per row: list of (cos value tensor or constant, is_positive)
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
        assert len(pos) == 1
        if rule == "negatives":
            candidates = [e.detach().item() for e, p in entries if not p]
        elif rule == "positive_as_zero":
            candidates = [0.0 if p else e.detach().item() for e, p in entries]
        else:
            raise ValueError(rule)
        hardest = max(candidates)
        step_rows.append((pos[0] - hardest, pos[0], hardest))
        rows.append(entries)
    n = len(step_rows)
    gap = sum(r[0] for r in step_rows) / n
    pos_mean = sum(r[1] for r in step_rows) / n
    neg_mean = sum(r[2] for r in step_rows) / n
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
    return loss, m, gap, pos_mean, neg_mean


def main():
    req = json.load(sys.stdin)
    out = []
    for case in req["cases"]:
        rule = case.get("hardest_negative", "negatives")
        m_prev = 0.0
        steps = []
        for st in case["steps"]:
            batches = st["micro"] if "micro" in st else [st]
            step_rows = []
            outs = []
            m = m_prev
            for mb in batches:
                v1 = torch.tensor(mb["v1"], dtype=torch.float64, requires_grad=True)
                v2 = torch.tensor(mb["v2"], dtype=torch.float64, requires_grad=True)
                loss, m, gap, pos_mean, neg_mean = micro_batch(
                    case["protocol"], case["s"], case["margin"], rule, m_prev, step_rows,
                    v1, v2, mb["labels"])
                g1, g2 = torch.autograd.grad(loss, [v1, v2])
                outs.append({
                    "loss": loss.item(),
                    "margin": m,
                    "batch_gap": gap,
                    "positive_cos": pos_mean,
                    "hardest_negative_cos": neg_mean,
                    "grad_v1": g1.flatten().tolist(),
                    "grad_v2": g2.flatten().tolist(),
                })
            steps.append({"micro": outs} if "micro" in st else outs[0])
            m_prev = m
        out.append({"steps": steps})
    json.dump({"cases": out}, sys.stdout)


if __name__ == "__main__":
    main()
