#!/usr/bin/env python3
"""Independent oracle for facerec-loss-heads' sharded (model-parallel) cross-entropy
(crates/loss-heads/src/sharded.rs, docs/heads.md "Model-parallel heads"), torch in float64.

Written from the math of a softmax cross-entropy whose class columns are split across W ranks,
with the ranks simulated one after another in this process:
  - the columns [0, C) are cut into W contiguous blocks, the first C % W one column longer;
  - the logits are z = s * cos, except at each row's target, z_y = s * (cos_y - m) (CosFace;
    s = 1, m = 0 is the plain softmax); only the block that owns column y_i applies the margin;
  - rank r computes its block's row maxima; the global maximum M is their maximum;
  - rank r sums exp(z - M) over its block; the global sum S is the sum of the W partial sums;
  - the target logit z_y comes from its owning block; loss_i = log S_i + M_i - z_{i, y_i};
  - the gradient w.r.t. the cosines is assembled block by block from the same reductions:
    dL/dcos_ij = s * (exp(z_ij - M_i) / S_i - [j = y_i]) / B (the margin m is a constant).
The answer also carries plain torch cross_entropy of the same logits and its autograd gradient,
and the script fails if the two disagree (beyond 1e-12), so a fixture cannot freeze a wrong value.

Usage: oracle_sharded_ce.py < request.json > answer.json
request = {"cases": [{"cos": [[..]] (B x C), "labels": [..], "world": W, "s": f, "m": f}]}
answer  = {"cases": [{"loss", "grad_cos" (flattened, row-major), "loss_torch", "grad_torch",
                      "blocks": [[start, end], ..]}]}
"""
import json
import sys

import torch

D = torch.float64


def blocks(c, w):
    base, rem = divmod(c, w)
    out, start = [], 0
    for r in range(w):
        n = base + (1 if r < rem else 0)
        out.append((start, start + n))
        start += n
    return out


def case(q):
    cos = torch.tensor(q["cos"], dtype=D)
    labels = torch.tensor(q["labels"], dtype=torch.long)
    s, m, w = float(q["s"]), float(q["m"]), int(q["world"])
    b, c = cos.shape
    parts = blocks(c, w)

    # Each rank's logits over its block: the margin only at targets it owns.
    z_blocks = []
    target = torch.zeros(b, dtype=D)
    for start, end in parts:
        z = s * cos[:, start:end].clone()
        for i in range(b):
            y = int(labels[i])
            if start <= y < end:
                z[i, y - start] = s * (cos[i, y] - m)
                target[i] = z[i, y - start]  # the owner provides the target logit
        z_blocks.append(z)
    neg_inf = torch.full((b,), float("-inf"), dtype=D)
    maxes = [zb.max(dim=1).values if zb.shape[1] > 0 else neg_inf for zb in z_blocks]
    big_m = torch.stack(maxes).max(dim=0).values
    big_s = sum((zb - big_m[:, None]).exp().sum(dim=1) for zb in z_blocks)
    loss = (big_s.log() + big_m - target).mean()

    grad_blocks = []
    for (start, end), zb in zip(parts, z_blocks):
        g = (zb - big_m[:, None]).exp() / big_s[:, None]
        for i in range(b):
            y = int(labels[i])
            if start <= y < end:
                g[i, y - start] -= 1.0
        grad_blocks.append(s * g / b)
    grad = torch.cat(grad_blocks, dim=1)

    # The plain single-process loss, by torch autograd.
    x = cos.clone().requires_grad_(True)
    onehot = torch.nn.functional.one_hot(labels, c).to(D)
    logits = s * (x - m * onehot)
    ref = torch.nn.functional.cross_entropy(logits, labels)
    (g_ref,) = torch.autograd.grad(ref, x)
    if abs(ref.item() - loss.item()) > 1e-12 or (g_ref - grad).abs().max().item() > 1e-12:
        sys.exit(f"oracle_sharded_ce: the simulated ranks disagree with torch: {loss} vs {ref}")
    return {
        "loss": loss.item(),
        "grad_cos": grad.reshape(-1).tolist(),
        "loss_torch": ref.item(),
        "grad_torch": g_ref.reshape(-1).tolist(),
        "blocks": [list(p) for p in parts],
    }


def main():
    req = json.load(sys.stdin)
    json.dump({"cases": [case(q) for q in req.get("cases", [])]}, sys.stdout)


if __name__ == "__main__":
    main()
