#!/usr/bin/env python3
"""Independent oracle for the GCE loss (crates/loss-heads/src/gce.rs), written from SPEC section 5.

Written the naive way on purpose, so that it shares nothing with the fast Rust computation:
- prototype replacement at the *prototype* level: W'_c = x_j (detached or not), then S = x W'^T;
  the self-pair S[j, c] is reset to the original prototype's similarity (keep_prototype) or sample j
  loses its target (drop);
- margins through acos/cos over the whole matrix (SPEC 5: t~ = cos(theta + m_t), n~ = cos(max(theta - m_n, 0))
  or the additive forms), the ArcFace threshold / easy-margin / detached treatments of SPEC 1(b);
- every term enumerated pair by pair: for anchor i, term 1 lists each negative (own non-targets, and
  each out-sample's non-targets with log(omega)) and term 2 lists each (negative, positive) product,
  i.e. a [B, B, C]-sized enumeration, then one logsumexp with a leading 0 (log(1 + sum)).

`gce` lists one 0-d tensor per pair; `gce_rows` enumerates the same pairs a row at a time (for C ~ 1,000)
and is what the answers come from; small cases run both and must agree.

Reads one JSON request on stdin: {"cases": [{dtype, emb [B][D], weight [C][D], labels [B], cfg,
replacement: {classes, samples}, optional grad_weight_rows}]} where cfg is GceConfig serialised by serde; writes
{"cases": [{loss, grad_emb, grad_weight}]} (gradients flattened row-major).
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from heads_oracle import as_input  # noqa: E402

COS_EPS = 1e-7


def normalize(x):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def target_margin(t, cfg):
    m = cfg["m_t"]
    if cfg["target_form"] == "additive":
        return t - m
    theta = torch.acos(t.clamp(-1 + COS_EPS, 1 - COS_EPS))
    phi = torch.cos(theta + m)
    mode = cfg["gradient"]
    if mode == "exact":
        th = math.cos(math.pi - m)
        return torch.where(t > th, phi, t - m * math.sin(m))
    if mode == "easy_margin":
        return torch.where(t > 0, phi, t)
    if mode == "detached":
        return t + (phi - t).detach()
    raise ValueError(mode)


def nontarget_margin(n, cfg):
    m = cfg["m_n"]
    if m == 0:
        return n
    if cfg["nontarget_form"] == "additive":
        return n + m
    theta = torch.acos(n.clamp(-1 + COS_EPS, 1 - COS_EPS))
    return torch.cos((theta - m).clamp_min(0.0))


def omega(cfg, b):
    w = cfg["out_weight"]
    if w == "inverse_batch":
        return 1.0 / (b - 1) if b > 1 else 0.0
    return float(w)


def lse_with_zero(terms):
    """log(1 + sum exp(terms)) for a list of 0-d tensors."""
    return torch.logsumexp(torch.stack([torch.zeros_like(terms[0])] + terms), 0)


def gce(emb, weight, labels, cfg, rep):
    pw = cfg["pairwise"]
    x = normalize(emb)
    w = normalize(weight)
    rows = []
    for c in range(w.shape[0]):
        rows.append(w[c])
    for c, j in zip(rep["classes"], rep["samples"]):
        rows[c] = x[j].detach() if pw["detach"] else x[j]
    w_rep = torch.stack(rows)
    S = (x @ w_rep.T).clamp(-1, 1)
    b, ncls = S.shape
    valid = [True] * b
    if rep["classes"]:
        S = S.clone()
        for c, j in zip(rep["classes"], rep["samples"]):
            if pw["self_pair"] == "keep_prototype":
                S[j, c] = (x[j] @ w[c]).clamp(-1, 1)
            else:
                valid[j] = False
    s = cfg["s"]
    om = omega(cfg, b)
    t = torch.stack([S[k, labels[k]] for k in range(b)])
    tt = target_margin(t, cfg)
    nn = nontarget_margin(S, cfg)

    def out_samples(i):
        if om == 0:
            return []
        if cfg["same_class_out"]:
            return [k for k in range(b) if k != i]
        return [k for k in range(b) if labels[k] != labels[i]]

    def negatives(k):
        return [s * nn[k, c] for c in range(ncls) if c != labels[k]]

    # out_gradient "detached": an out-sample's similarities are constants in anchor i's terms.
    cut = (lambda v: v.detach()) if cfg.get("out_gradient", "live") == "detached" else (lambda v: v)
    total = torch.zeros((), dtype=S.dtype)
    count = 0
    for i in range(b):
        if not valid[i]:
            continue
        # Term 1: every negative against this anchor's target.
        terms = [n - s * tt[i] for n in negatives(i)]
        for k in out_samples(i):
            terms += [cut(n) + math.log(om) - s * tt[i] for n in negatives(k)]
        l1 = lse_with_zero(terms)
        # Term 2: this anchor's negatives against every positive.
        positives = [-s * tt[i]] + [-s * cut(tt[k]) + math.log(om) for k in out_samples(i) if valid[k]]
        terms = [n + p for n in negatives(i) for p in positives]
        l2 = lse_with_zero(terms)
        total = total + cfg["term1_weight"] * l1 + cfg["term2_weight"] * l2
        count += 1
    return total / max(count, 1)


def gce_rows(emb, weight, labels, cfg, rep):
    """The same enumeration as `gce`, one anchor at a time over whole rows.

    For anchor i, term 1 is the 1-D tensor of every (negative - anchor target) difference: sample k's
    non-target row (its target entry removed by a boolean mask) plus k's log-weight (0 for k = i,
    log(omega) for an out-sample), concatenated over k; term 2 is the outer sum of the anchor's
    non-target row with the list of positives, flattened. Nothing is summed before the final
    logsumexp, so this is still the pair-by-pair sum of SPEC 5, only without one Python object per
    pair (C ~ 1,000 at B = 16 takes seconds instead of minutes).
    """
    pw = cfg["pairwise"]
    x = normalize(emb)
    w = normalize(weight)
    rows = [w[c] for c in range(w.shape[0])]
    for c, j in zip(rep["classes"], rep["samples"]):
        rows[c] = x[j].detach() if pw["detach"] else x[j]
    S = (x @ torch.stack(rows).T).clamp(-1, 1)
    b, ncls = S.shape
    valid = [True] * b
    if rep["classes"]:
        S = S.clone()
        for c, j in zip(rep["classes"], rep["samples"]):
            if pw["self_pair"] == "keep_prototype":
                S[j, c] = (x[j] @ w[c]).clamp(-1, 1)
            else:
                valid[j] = False
    s = cfg["s"]
    om = omega(cfg, b)
    t = torch.stack([S[k, labels[k]] for k in range(b)])
    tt = target_margin(t, cfg)
    nn = nontarget_margin(S, cfg)
    cols = torch.arange(ncls)
    neg = [s * nn[k][cols != labels[k]] for k in range(b)]

    def out_samples(i):
        if om == 0:
            return []
        if cfg["same_class_out"]:
            return [k for k in range(b) if k != i]
        return [k for k in range(b) if labels[k] != labels[i]]

    cut = (lambda v: v.detach()) if cfg.get("out_gradient", "live") == "detached" else (lambda v: v)
    zero = torch.zeros(1, dtype=S.dtype)
    total = torch.zeros((), dtype=S.dtype)
    count = 0
    for i in range(b):
        if not valid[i]:
            continue
        outs = out_samples(i)
        t1 = [neg[i] - s * tt[i]] + [cut(neg[k]) + math.log(om) - s * tt[i] for k in outs]
        l1 = torch.logsumexp(torch.cat([zero] + t1), 0)
        pos = torch.stack([-s * tt[i]] + [-s * cut(tt[k]) + math.log(om) for k in outs if valid[k]])
        t2 = (neg[i].view(-1, 1) + pos.view(1, -1)).flatten()
        l2 = torch.logsumexp(torch.cat([zero, t2]), 0)
        total = total + cfg["term1_weight"] * l1 + cfg["term2_weight"] * l2
        count += 1
    return total / max(count, 1)


# Cases with B * B * C up to this many pairs also run the one-object-per-pair loop, and the two
# enumerations must agree (a check of the oracle itself).
SMALL = 5000


def main():
    req = json.load(sys.stdin)
    out = []
    for case in req["cases"]:
        # "dtype" is the precision of our code under test: the inputs are rounded to it, and the
        # oracle computes in float64 on those values, so that its answer (and its frozen fixture)
        # does not depend on the CPU's float32 kernels.
        dtype = torch.float64 if case["dtype"] == "float64" else torch.float32
        emb = as_input(case["emb"], dtype).requires_grad_(True)
        weight = as_input(case["weight"], dtype).requires_grad_(True)
        args = (emb, weight, case["labels"], case["cfg"], case["replacement"])
        loss = gce_rows(*args)
        b, ncls = len(case["emb"]), len(case["weight"])
        if b * b * ncls <= SMALL:
            loop = gce(*args).item()
            tol = 1e-9
            if abs(loop - loss.item()) > tol * max(1.0, abs(loop)):
                raise SystemExit(f"oracle self-check: loop {loop} != rows {loss.item()}")
        ge, gw = torch.autograd.grad(loss, [emb, weight], allow_unused=True)
        gw = torch.zeros_like(weight) if gw is None else gw
        if "grad_weight_rows" in case:
            # Only these class rows (a large classifier's full gradient would be a large answer).
            gw = gw[torch.tensor(case["grad_weight_rows"], dtype=torch.long)]
        out.append(
            {
                "loss": loss.item(),
                "grad_emb": ge.flatten().tolist(),
                "grad_weight": gw.flatten().tolist(),
            }
        )
    json.dump({"cases": out}, sys.stdout)


if __name__ == "__main__":
    main()
