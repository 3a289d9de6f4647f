#!/usr/bin/env python3
"""Independent PyTorch oracle for the ViT of crates/backbone (facerec), run by testkit::oracle.

Written from the architecture description in docs/backbones.md (arcface_torch's face ViT: patch
embedding by a strided conv, learned position embeddings, pre-norm blocks with multi-head
self-attention and a ReLU6 MLP, final LayerNorm, MAE-style token masking filled with a mask token
after the norm, feature head Linear -> BN1d -> Linear -> BN1d with eps 2e-5); no reference code was
copied. Module attribute names are chosen so that the state_dict keys are arcface_torch's.

Reads one JSON request on stdin, writes one JSON answer on stdout:
  {"cmd": "keys", "arch": ARCH}
      -> {"keys": [[name, [shape...]], ...], "trainable": int}
  {"cmd": "forward", "arch": ARCH, "params": {name: [values...]}, "input": [...], "batch": B,
   "noise": [...]}
      loads the parameters (float64, strict), then answers {"eval_out", "train_out",
      "masked_out"} (flattened [B, E]): eval mode; train mode without masking (batch statistics
      in the head's BatchNorms; drop path must be 0 in ARCH); train mode with the masking noise
      `noise` ([B, L], the kept tokens are the smallest-noise ones).
ARCH: {"embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "input_size",
       "embedding_size", "qkv_bias", "mask_ratio"}
"""
import json
import sys

import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, dim, heads, qkv_bias):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        dh = d // self.heads
        # [B, N, 3D] -> three [B, H, N, dh]
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dh).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) / dh ** 0.5, dim=-1)
        y = torch.einsum("bhij,bhjd->bhid", w, v).transpose(1, 2).reshape(b, n, d)
        return self.proj(y)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(torch.clamp(self.fc1(x), 0.0, 6.0))


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads, hidden, qkv_bias):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = SelfAttention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = FeedForward(dim, hidden)

    def forward(self, x):
        # Drop path is identity here (the tests use rate 0 in train mode).
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbedding(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        y = self.proj(x)  # [B, D, g, g]
        return y.flatten(2).transpose(1, 2)


class FaceViT(nn.Module):
    def __init__(self, a):
        super().__init__()
        d = a["embed_dim"]
        grid = a["input_size"] // a["patch_size"]
        self.tokens = grid * grid
        self.keep_ratio = 1.0 - a["mask_ratio"]
        hidden = int(d * a["mlp_ratio"])
        self.patch_embed = PatchEmbedding(a["patch_size"], d)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.tokens, d))
        self.blocks = nn.ModuleList(
            [EncoderBlock(d, a["num_heads"], hidden, a["qkv_bias"]) for _ in range(a["depth"])]
        )
        self.norm = nn.LayerNorm(d, eps=1e-5)
        e = a["embedding_size"]
        self.feature = nn.Sequential(
            nn.Linear(self.tokens * d, d, bias=False),
            nn.BatchNorm1d(d, eps=2e-5),
            nn.Linear(d, e, bias=False),
            nn.BatchNorm1d(e, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))

    def forward(self, x, noise=None):
        t = self.patch_embed(x) + self.pos_embed
        b, n, d = t.shape
        if noise is not None:
            kept = int(n * self.keep_ratio)
            order = torch.sort(noise, dim=1).indices  # positions by increasing noise
            t = torch.stack([t[i, order[i, :kept]] for i in range(b)])
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        if noise is not None:
            full = self.mask_token.expand(b, n, d).clone()
            for i in range(b):
                full[i, order[i, :kept]] = t[i]
            t = full
        return self.feature(t.reshape(b, n * d))


def flat(t):
    return t.detach().reshape(-1).tolist()


def main():
    req = json.load(sys.stdin)
    torch.manual_seed(0)
    model = FaceViT(req["arch"])
    if req["cmd"] == "keys":
        sd = model.state_dict()
        json.dump({
            "keys": [[k, list(v.shape)] for k, v in sd.items()],
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }, sys.stdout)
        return
    model = model.double()
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = torch.tensor(req["params"][k], dtype=v.dtype).reshape(v.shape)
    model.load_state_dict(sd, strict=True)
    a = req["arch"]
    s = a["input_size"]
    x = torch.tensor(req["input"], dtype=torch.float64).reshape(req["batch"], 3, s, s)
    noise = torch.tensor(req["noise"], dtype=torch.float64).reshape(req["batch"], model.tokens)
    with torch.no_grad():
        model.eval()
        eval_out = model(x)
        model.train()
        train_out = model(x)
        masked_out = model(x, noise)
    json.dump({"eval_out": flat(eval_out), "train_out": flat(train_out),
               "masked_out": flat(masked_out)}, sys.stdout)


if __name__ == "__main__":
    main()
