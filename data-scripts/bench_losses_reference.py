#!/usr/bin/env python3
"""PyTorch eager references for `cargo xtask bench-losses` (benches/src/bin/bench-losses.rs).

Each head is written the way the reference code computes it (SPEC 1 and 2): arcface_torch, the
ElasticFace/CoReFace headers and the SphereFace PyTorch port take acos (and cos) of the whole [B, C]
cosine matrix and put the margin in with a one-hot mask or an index assignment. Timed: forward from
the raw scores (clamp to [-1, 1], as the classifier does) through the head and cross-entropy, and the
backward to the raw scores, exactly what the Rust side times. In-place tricks of the reference code
(arccos_ under no_grad, index assignment on the clamp output) are kept: they are its fast paths.

Usage:
  bench_losses_reference.py --threads 2 [--device cpu|cuda] [--dim 512 --with-classifier]
      serve mode (what bench-losses uses): prints {"torch", "threads"}, then answers each stdin line
      "HEAD B C REPS" with {"ms": [...], "cpu_ms": [...]} (wall and process CPU time), so the caller can interleave its own repetitions.
  bench_losses_reference.py --threads 2 --heads a,b --shapes 128x10000,512x100000 --reps 3
      batch mode: one warm-up then REPS timed runs per head and shape, one JSON object
      {"torch", "threads", "results": [{head, b, c, device, ms}]}.
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

S = 64.0


def onehot(cos, labels):
    return torch.zeros_like(cos).scatter_(1, labels[:, None], 1.0)


def normface(cos, labels):
    return cos * S


def cosface(cos, labels, m=0.35):
    # arcface_torch CombinedMarginLoss, CosFace branch: in-place index assignment on the targets.
    logits = cos
    index = torch.where(labels != -1)[0]
    target = logits[index, labels[index]]
    logits[index, labels[index]] = target - m
    return logits * S


def arcface_exact(cos, labels, m=0.5):
    # acos / cos over the whole matrix in autograd, margin through a one-hot, threshold fallback.
    c = cos.clamp(-1 + 1e-7, 1 - 1e-7)
    oh = onehot(cos, labels)
    phi = torch.cos(torch.acos(c) + oh * m)
    th, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m
    return torch.where(c > th, phi, c - oh * mm) * S


def arcface_detached(cos, labels, m=0.5):
    # Current arcface_torch: in-place arccos_/cos_ of the whole matrix under no_grad.
    logits = cos
    index = torch.where(labels != -1)[0]
    target = logits[index, labels[index]]
    with torch.no_grad():
        target.arccos_()
        logits.arccos_()
        logits[index, labels[index]] = target + m
        logits.cos_()
    return logits * S


def combined(cos, labels, m1=1.0, m2=0.3, m3=0.2):
    # MXNet graph: arccos -> *m1 -> +m2 -> cos -> -m3 -> *s on the whole matrix, target via one-hot.
    c = cos.clamp(-1 + 1e-7, 1 - 1e-7)
    oh = onehot(cos, labels)
    t = torch.acos(c)
    t = t * (1 + oh * (m1 - 1)) + oh * m2
    return (torch.cos(t) - oh * m3) * S


def sphereface(cos, labels, m=4, lam=5.0):
    # The SphereFace PyTorch port: Chebyshev cos(m theta), theta, k and psi over the whole matrix.
    c = cos.clamp(-1, 1)
    cos_m = 8 * c**4 - 8 * c**2 + 1
    theta = torch.acos(c).detach()
    k = (m * theta / math.pi).floor()
    phi = (-1.0) ** k * cos_m - 2 * k
    oh = onehot(cos, labels).bool()
    out = torch.where(oh, (lam * c + phi) / (1 + lam), c)
    return out * S


def elastic(cos, labels, arc, plus, m, sigma):
    # ElasticFace header: normal margins scattered into a one-hot, acos/cos over the whole matrix.
    index = torch.where(labels != -1)[0]
    margin = torch.normal(mean=m, std=sigma, size=labels[index, None].size(), device=cos.device)
    if plus:
        with torch.no_grad():
            distmat = cos[index, labels.view(-1)].detach().clone()
            _, idx_sorted = torch.sort(distmat, dim=0, descending=True)
            margin, _ = torch.sort(margin, dim=0)
        margin = margin[idx_sorted]  # the released code's gather (code-faithful)
    m_hot = torch.zeros(index.size()[0], cos.size()[1], device=cos.device)
    m_hot.scatter_(1, labels[index, None], margin)
    # In place on the clamp output, as the released header does.
    if arc:
        cos.acos_()
        cos[index] += m_hot
        return cos.cos_().mul_(S)
    cos[index] -= m_hot
    return cos * S


def gce(cos, labels, angular, m_t, m_n):
    """GCE (SPEC 5) written the straightforward way: margins through acos/cos of the whole matrix
    and one-hot masks, the row sums R_k and the out-sample sums in the linear domain (exp after a
    global max shift, masked sums, a [B, B] mask product), as SPEC 5's own recipe reads. Returns the
    loss (omega = 1/(B - 1), out-samples = other classes, (L1 + L2)/2)."""
    b = cos.shape[0]
    oh = onehot(cos, labels).bool()
    if angular:
        theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
        th, mm = math.cos(math.pi - m_t), math.sin(math.pi - m_t) * m_t
        tgt = torch.where(cos > th, torch.cos(theta + m_t), cos - mm)
        non = torch.cos((theta - m_n).clamp_min(0))
    else:
        tgt = cos - m_t
        non = cos + m_n
    t = (tgt * oh).sum(1)  # the target of each row
    z = (S * non).masked_fill(oh, float("-inf"))
    zmax = z.max().detach()
    r = torch.exp(z - zmax).sum(1)  # R_k * e^{-zmax}
    omega = 1.0 / (b - 1)
    out = (labels[:, None] != labels[None, :]).to(cos.dtype) * omega
    neg = r + out @ r  # own + weighted out-sample negatives, * e^{-zmax}
    l1 = F.softplus(torch.log(neg) + zmax - S * t)
    tmax = (-S * t).max().detach()
    p = torch.exp(-S * t - tmax)
    pos = p + out @ p
    l2 = F.softplus(torch.log(r) + zmax + torch.log(pos) + tmax)
    return ((l1 + l2) / 2).mean()


# Losses (not logits): timed without the cross-entropy.
LOSSES = {
    "gce": lambda c, y: gce(c, y, True, 0.5, 0.1),
    "gce_additive": lambda c, y: gce(c, y, False, 0.35, 0.1),
}


def curricularface(cos, labels, m=0.5, t=0.0):
    # Whole-matrix acos/cos, hard negatives by a [B, C] comparison with the targets' phi.
    c = cos.clamp(-1 + 1e-7, 1 - 1e-7)
    oh = onehot(cos, labels)
    target = (c * oh).sum(dim=1, keepdim=True)
    phi = torch.cos(torch.acos(target) + m)
    phi = torch.where(target > math.cos(math.pi - m), phi, target - math.sin(math.pi - m) * m)
    hard = (c > phi.detach()).float() * (1 - oh)
    neg = hard * c * (t + c) + (1 - hard) * c
    return (oh * phi + (1 - oh) * neg) * S


def adaface(cos, labels, m=0.4):
    # Every row at z_hat = 0 (the Rust row is timed without norms): g_angle = 0, g_add = m, written
    # as the general per-row form over the whole matrix.
    c = cos.clamp(-1 + 1e-7, 1 - 1e-7)
    oh = onehot(cos, labels)
    zhat = torch.zeros(cos.shape[0], 1, dtype=cos.dtype, device=cos.device)
    g_angle, g_add = -m * zhat, m * zhat + m
    theta = torch.acos(c) + oh * g_angle
    return (torch.cos(theta) - oh * g_add) * S


def softmax(scores, labels):
    return scores  # a linear layer's output goes straight into the cross-entropy


HEADS = {
    "softmax": softmax,
    "normface": normface,
    "sphereface": sphereface,
    "cosface": cosface,
    "arcface": arcface_exact,
    "arcface_detached": arcface_detached,
    "combined": combined,
    "elastic_arc": lambda c, y: elastic(c, y, True, False, 0.5, 0.05),
    "elastic_cos": lambda c, y: elastic(c, y, False, False, 0.35, 0.05),
    "elastic_arc_plus": lambda c, y: elastic(c, y, True, True, 0.5, 0.0175),
    "elastic_cos_plus": lambda c, y: elastic(c, y, False, True, 0.35, 0.025),
    "curricularface": curricularface,
    "adaface": adaface,
    # Pooled over the K = 3 sub-centres in Case.time_once (the leaf is [B, 3C]), then ArcFace.
    "subcenter_arcface": arcface_exact,
    # Timed without norms, as the Rust row: every row gets the smallest margin l_m = 0.45.
    "magface": lambda c, y: arcface_exact(c, y, m=0.45),
}

# Rows per class of a head's classifier (sub-centres).
SUB_CENTRES = {"subcenter_arcface": 3}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Case:
    """Inputs of one shape: the [B, C] raw-score leaf (or embeddings + weight) and the labels."""

    def __init__(self, b, c, device, dim, with_classifier, k=1):
        torch.manual_seed(0)
        self.device = device
        self.k = k
        self.with_classifier = with_classifier
        self.labels = torch.randint(c, (b,), device=device)
        if with_classifier:
            self.emb = torch.randn(b, dim, device=device, requires_grad=True)
            self.weight = (torch.randn(c * k, dim, device=device) * 0.01).requires_grad_(True)
            self.leaves = [self.emb, self.weight]
        else:
            self.raw = (torch.rand(b, c * k, device=device) * 2 - 1).requires_grad_(True)
            self.leaves = [self.raw]

    def time_once(self, name):
        """(wall, process CPU) milliseconds of one forward + backward."""
        sync(self.device)
        t0 = time.perf_counter()
        c0 = time.process_time()
        if self.with_classifier:
            cos = F.linear(F.normalize(self.emb), F.normalize(self.weight)).clamp(-1, 1)
        else:
            cos = self.raw.clamp(-1, 1)
        if self.k > 1:
            cos = cos.view(cos.shape[0], -1, self.k).max(dim=2).values
        if name in LOSSES:
            loss = LOSSES[name](cos, self.labels)
        else:
            loss = F.cross_entropy(HEADS[name](cos, self.labels), self.labels)
        grads = torch.autograd.grad(loss, self.leaves)
        sync(self.device)
        ms = (time.perf_counter() - t0) * 1e3
        cpu_ms = (time.process_time() - c0) * 1e3
        del cos, loss, grads
        return ms, cpu_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--with-classifier", action="store_true")
    ap.add_argument("--heads", help="batch mode: comma-separated heads")
    ap.add_argument("--shapes", help="batch mode: comma-separated BxC")
    ap.add_argument("--reps", type=int, default=3, help="batch mode: timed repetitions after a warm-up")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = {}

    def case(b, c, name):
        k = SUB_CENTRES.get(name, 1)
        if (b, c, k) not in cases:
            cases.clear()  # one shape in memory at a time
            cases[(b, c, k)] = Case(b, c, device, args.dim, args.with_classifier, k)
        return cases[(b, c, k)]

    if args.heads is None:
        # Serve mode: one request per line, "HEAD B C REPS", one JSON line back; the Rust side
        # interleaves these with its own repetitions so both see the same machine load.
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
        for line in sys.stdin:
            name, b, c, reps = line.split()
            cs = case(int(b), int(c), name)
            t = [cs.time_once(name) for _ in range(int(reps))]
            print(json.dumps({"ms": [w for w, _ in t], "cpu_ms": [c for _, c in t]}), flush=True)
        return
    results = []
    for shape in args.shapes.split(","):
        b, c = (int(x) for x in shape.split("x"))
        for name in args.heads.split(","):
            cs = case(b, c, name)
            t = [cs.time_once(name) for _ in range(args.reps + 1)][1:]
            results.append({"head": name, "b": b, "c": c, "device": args.device,
                            "ms": [w for w, _ in t], "cpu_ms": [c for _, c in t]})
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
