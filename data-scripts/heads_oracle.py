#!/usr/bin/env python3
"""Independent oracle for facerec-loss-heads (SPEC sections 1 and 2, docs/heads.md).

Written from the math with torch autograd, the way the reference code computes it: acos and cos over
the whole [B, C] cosine matrix, margins put in place with a one-hot mask. The Rust crate gathers the
B target cosines instead and uses cos(t + m) = cos t cos m - sin t sin m and Chebyshev polynomials;
agreement of losses and gradients therefore checks both the formulas and the gather/scatter.

Usage: heads_oracle.py < request.json > answer.json

request = {
  "heads": [ {"head": <HeadConfig as JSON, tagged by "type">, "dtype": "float64" | "float32",
              "cos": [[...]], "labels": [...],
              "step": int (sphereface), "norms": [...] (sphereface, optional),
              "draw": [...] (elastic: the raw N(m, sigma) draw before any "+" assignment),
              "state": {"t"} (curricularface) or {"norm_mean", "norm_std"} (adaface)} ],
  "linear": [ {"dtype", "emb": [[...]], "weight": [[...]], "bias": [...], "labels": [...]} ],
  "partial_fc": [ {"labels": [...], "u": [...], "num_sample": int} ],
  "embedding_heads": [ {"head": {"type": "subcenter_arcface" | "magface", ...}, "dtype",
                        "emb": [[...]] (B x D, un-normalised), "weight": [[...]] (C*k x D for
                        subcenter_arcface, class c in rows c*k .. c*k+k-1; C x D for magface),
                        "labels": [...]} ],
}
answer = {"heads": [{"loss", "logits", "grad_cos", "margins"?}], "linear": [{"loss", "grad_emb",
          "grad_weight", "grad_bias"}], "partial_fc": [{"index", "labels"}],
          "embedding_heads": [{"loss", "cos" (pooled B x C), "grad_emb", "grad_weight"}]}
          (all flattened lists)
"dtype" is the precision of our code under test: the inputs are rounded to it, and the oracle then
computes in float64 (see as_input).
"""
import json
import math
import sys

import torch

COS_EPS = 1e-7


def ce(logits, labels):
    """L = mean_i -log softmax(z_i)_{y_i}, written out."""
    z = logits - logits.max(dim=1, keepdim=True).values.detach()
    logp = z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))
    return -logp.gather(1, labels[:, None]).mean()


def onehot(labels, c):
    return torch.nn.functional.one_hot(labels, c).bool()


def angular(cos, labels, s, m1, m2, m3, mode):
    """s * (cos(m1 theta + m2) - m3) at the target, s cos theta elsewhere (SPEC 1(b))."""
    oh = onehot(labels, cos.shape[1])
    theta = torch.acos(cos.clamp(-1 + COS_EPS, 1 - COS_EPS))
    phi = torch.cos(m1 * theta + m2) - m3
    if mode == "exact":
        theta_star = (math.pi - m2) / m1
        if theta_star < math.pi:
            fallback = cos - (math.pi - theta_star) * math.sin(theta_star) - m3
            phi = torch.where(cos > math.cos(theta_star), phi, fallback)
    elif mode == "easy_margin":
        phi = torch.where(cos > 0, phi, cos)
    elif mode == "detached":
        phi = cos + (phi - cos).detach()
    else:
        raise ValueError(mode)
    return s * torch.where(oh, phi, cos)


def sphereface(cos, labels, cfg, step, norms):
    m = cfg["m"]
    lam = max(cfg["lambda_min"], cfg["lambda_base"] * (1 + cfg["lambda_gamma"] * step) ** (-cfg["lambda_power"]))
    theta = torch.acos(cos.clamp(-1 + COS_EPS, 1 - COS_EPS))
    k = torch.floor(m * theta / math.pi).clamp(0, m - 1).detach()
    psi = (-1.0) ** k * torch.cos(m * theta) - 2 * k
    target = (lam * cos + psi) / (1 + lam)
    z = torch.where(onehot(labels, cos.shape[1]), target, cos)
    scale = cfg["s"] if norms is None else norms[:, None]
    return z * scale


def elastic_margins(draw, target, plus):
    if plus is None:
        return draw
    sorted_e = torch.sort(draw).values
    order = torch.argsort(target.detach(), descending=True, stable=True)  # order[r]: r-th easiest
    if plus == "paper_intent":
        margin = torch.empty_like(sorted_e)
        margin[order] = sorted_e  # the r-th easiest gets the r-th smallest
        return margin
    if plus == "code_faithful":
        return sorted_e[order]  # indexes the sorted draw with the ranking
    raise ValueError(plus)


def elastic(cos, labels, cfg, draw, arc):
    oh = onehot(labels, cos.shape[1])
    target = cos.gather(1, labels[:, None])[:, 0]
    e = elastic_margins(draw, target, cfg.get("assignment"))[:, None]
    if arc:
        theta = torch.acos(cos.clamp(-1 + COS_EPS, 1 - COS_EPS))
        phi = torch.cos(theta + e)
        phi = torch.where(cos > torch.cos(math.pi - e), phi, cos - e * torch.sin(e))
    else:
        phi = cos - e
    return cfg["s"] * torch.where(oh, phi, cos), e[:, 0]


def curricularface(cos, labels, cfg, t):
    """CurricularFace (arXiv 2004.00288): ArcFace's target phi (with its exact-mode fallback);
    a negative with cos_j > phi_y (chosen on detached values) becomes cos_j * (t + cos_j)."""
    oh = onehot(labels, cos.shape[1])
    m = cfg["m"]
    theta = torch.acos(cos.clamp(-1 + COS_EPS, 1 - COS_EPS))
    phi = torch.where(cos > math.cos(math.pi - m), torch.cos(theta + m), cos - m * math.sin(m))
    phi_y = (phi * oh).sum(dim=1, keepdim=True)
    hard = (cos.detach() > phi_y.detach()) & ~oh
    neg = torch.where(hard, cos * (t + cos), cos)
    return cfg["s"] * torch.where(oh, phi, neg)


def adaface(cos, labels, cfg, norms, mean, std):
    """AdaFace (arXiv 2204.00964): z_hat = clip((|x| - mean) * h / (std + 1e-3), -1, 1) on the
    detached norms clamped to [0.001, 100]; target cos(theta + g_angle) - g_add with
    g_angle = -m z_hat, g_add = m z_hat + m; past theta + g_angle = pi the per-row fallback
    cos - g_angle sin(g_angle)."""
    oh = onehot(labels, cos.shape[1])
    m = cfg["m"]
    if norms is None:
        zhat = torch.zeros(cos.shape[0], dtype=cos.dtype)
    else:
        n = norms.detach().clamp(0.001, 100.0)
        zhat = ((n - mean) * (cfg["h"] / (std + 1e-3))).clamp(-1.0, 1.0)
    g_angle = (-m * zhat)[:, None]
    g_add = (m * zhat + m)[:, None]
    theta = torch.acos(cos.clamp(-1 + COS_EPS, 1 - COS_EPS))
    phi = torch.where(cos > torch.cos(math.pi - g_angle), torch.cos(theta + g_angle), cos - g_angle * torch.sin(g_angle))
    return cfg["s"] * torch.where(oh, phi - g_add, cos)


def cosine_matrix(emb, weight):
    """clamp(normalize(emb) @ normalize(weight)^T, -1, 1)."""
    unit = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit(emb) @ unit(weight).T).clamp(-1.0, 1.0)


def subcenter_arcface(emb, weight, labels, cfg):
    """Sub-center ArcFace (Deng et al., ECCV 2020): the cosine to a class is the max over its k
    sub-centres (weight rows c*k .. c*k+k-1), then ArcFace's margin on it (the 'gradient' mode)."""
    k = cfg["k"]
    cos_all = cosine_matrix(emb, weight)
    b = cos_all.shape[0]
    cos = cos_all.reshape(b, -1, k).max(dim=2).values
    z = angular(cos, labels, cfg["s"], 1.0, cfg["m"], 0.0, cfg["gradient"])
    return ce(z, labels), cos


def magface(emb, weight, labels, cfg):
    """MagFace (Meng et al., CVPR 2021): a = clamp(|x|, l_a, u_a), margin m(a) linear from l_m at
    l_a to u_m at u_a, target cos(theta + m(a)) (past theta + m = pi: cos theta - m sin m), and
    the loss adds lambda_g * mean(1/a + a/u_a^2). Gradients flow through a into the embedding."""
    la, ua, lm, um = cfg["l_a"], cfg["u_a"], cfg["l_m"], cfg["u_m"]
    a = emb.norm(dim=1).clamp(la, ua)
    m = ((um - lm) / (ua - la) * (a - la) + lm)[:, None]
    cos = cosine_matrix(emb, weight)
    theta = torch.acos(cos.clamp(-1 + COS_EPS, 1 - COS_EPS))
    phi = torch.where(cos > torch.cos(math.pi - m), torch.cos(theta + m), cos - m * torch.sin(m))
    z = cfg["s"] * torch.where(onehot(labels, cos.shape[1]), phi, cos)
    g = 1.0 / a + a / ua**2
    return ce(z, labels) + cfg["lambda_g"] * g.mean(), cos


def as_input(values, dtype):
    """`values` rounded to the case's dtype (the numbers our code sees), then held in float64: the
    oracle computes in float64 whatever the case's dtype, so its answer is the exact function of
    those inputs to ~1e-15 on any CPU (a float32 computation rounds differently on another CPU's
    kernels, and its frozen answer would then move)."""
    return torch.tensor(values, dtype=torch.float64).to(dtype).to(torch.float64)


def embedding_head_case(case):
    dtype = getattr(torch, case["dtype"])
    emb = as_input(case["emb"], dtype).requires_grad_(True)
    weight = as_input(case["weight"], dtype).requires_grad_(True)
    labels = torch.tensor(case["labels"], dtype=torch.int64)
    cfg = case["head"]
    if cfg["type"] == "subcenter_arcface":
        loss, cos = subcenter_arcface(emb, weight, labels, cfg)
    elif cfg["type"] == "magface":
        loss, cos = magface(emb, weight, labels, cfg)
    else:
        raise ValueError(cfg["type"])
    ge, gw = torch.autograd.grad(loss, [emb, weight])
    return {
        "loss": loss.item(),
        "cos": cos.detach().flatten().tolist(),
        "grad_emb": ge.flatten().tolist(),
        "grad_weight": gw.flatten().tolist(),
    }


def head_case(case):
    dtype = getattr(torch, case["dtype"])
    cos = as_input(case["cos"], dtype).requires_grad_(True)
    labels = torch.tensor(case["labels"], dtype=torch.int64)
    cfg = case["head"]
    kind = cfg["type"]
    margins = None
    if kind == "normface":
        z = cfg["s"] * cos
    elif kind == "softmax":
        z = cos * 1.0
    elif kind == "cosface":
        z = cfg["s"] * torch.where(onehot(labels, cos.shape[1]), cos - cfg["m"], cos)
    elif kind == "arcface":
        z = angular(cos, labels, cfg["s"], 1.0, cfg["m"], 0.0, cfg["gradient"])
    elif kind == "combined":
        z = angular(cos, labels, cfg["s"], cfg["m1"], cfg["m2"], cfg["m3"], cfg["gradient"])
    elif kind == "sphereface":
        norms = case.get("norms")
        norms = None if norms is None else as_input(norms, dtype)
        z = sphereface(cos, labels, cfg, case["step"], norms)
    elif kind.startswith("elastic_"):
        draw = as_input(case["draw"], dtype)
        z, margins = elastic(cos, labels, cfg, draw, arc=kind.startswith("elastic_arc"))
    elif kind == "curricularface":
        z = curricularface(cos, labels, cfg, case["state"]["t"])
    elif kind == "adaface":
        norms = case.get("norms")
        norms = None if norms is None else as_input(norms, dtype)
        z = adaface(cos, labels, cfg, norms, case["state"]["norm_mean"], case["state"]["norm_std"])
    else:
        raise ValueError(kind)
    loss = ce(z, labels)
    (grad,) = torch.autograd.grad(loss, cos)
    out = {"loss": loss.item(), "logits": z.detach().flatten().tolist(), "grad_cos": grad.flatten().tolist()}
    if margins is not None:
        out["margins"] = margins.flatten().tolist()
    return out


def linear_case(case):
    dtype = getattr(torch, case["dtype"])
    t = lambda key: as_input(case[key], dtype).requires_grad_(True)
    emb, weight, bias = t("emb"), t("weight"), t("bias")
    labels = torch.tensor(case["labels"], dtype=torch.int64)
    loss = ce(emb @ weight.T + bias, labels)
    ge, gw, gb = torch.autograd.grad(loss, [emb, weight, bias])
    return {
        "loss": loss.item(),
        "grad_emb": ge.flatten().tolist(),
        "grad_weight": gw.flatten().tolist(),
        "grad_bias": gb.flatten().tolist(),
    }


def partial_fc_case(case):
    labels = torch.tensor(case["labels"], dtype=torch.int64)
    u = torch.tensor(case["u"], dtype=torch.float32)
    num_sample = case["num_sample"]
    positives = torch.unique(labels, sorted=True)
    if num_sample >= positives.numel():
        u = u.clone()
        u[positives] = 2.0
        index = torch.sort(torch.topk(u, num_sample).indices).values
    else:
        index = positives
    return {"index": index.tolist(), "labels": torch.searchsorted(index, labels).tolist()}


def main():
    torch.set_num_threads(1)
    req = json.load(sys.stdin)
    ans = {
        "heads": [head_case(c) for c in req.get("heads", [])],
        "linear": [linear_case(c) for c in req.get("linear", [])],
        "partial_fc": [partial_fc_case(c) for c in req.get("partial_fc", [])],
    }
    if "embedding_heads" in req:  # only then: the frozen answers of older requests keep their keys
        ans["embedding_heads"] = [embedding_head_case(c) for c in req["embedding_heads"]]
    json.dump(ans, sys.stdout)


if __name__ == "__main__":
    main()
