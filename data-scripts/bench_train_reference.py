#!/usr/bin/env python3
"""PyTorch eager reference for `cargo xtask bench-train` (benches/src/bin/bench-train.rs).

Whole training steps the way a PyTorch user writes them (arcface_torch's loop: forward, normalised
linear classifier, ArcFace, cross-entropy, backward, `clip_grad_norm_` of the backbone, SGD step,
`loss.item()` for the log), and eval-mode embedding throughput under `torch.no_grad()` with the
flip test, on the independent oracle networks of `backbone_oracle.py`. Nothing is tuned: default
allocator, default `torch.optim.SGD` (on CPU its per-parameter loop), contiguous (NCHW) tensors.

`--malloc keep` applies the same glibc settings as facerec's default (`crates/process`,
`FACEREC_MALLOC=keep`: M_MMAP_THRESHOLD = 1 GiB, M_TRIM_THRESHOLD = 2 GiB - 1, through `mallopt`
before torch is imported), and `--omp short` sets `GOMP_SPINCOUNT=3000` before torch (and
with it libgomp) is loaded, as facerec does by default (`--omp passive`: `OMP_WAIT_POLICY=PASSIVE`,
facerec's `FACEREC_OMP_WAIT=passive`); so the comparison can also be made with
facerec's process settings on both sides.

Serve mode (the only mode): prints {"torch", "threads", "malloc", "omp"}, then answers one JSON request
per stdin line with one JSON line:
  {"cmd": "setup", "model": {<[model] table>}, "batch": B, "classes": C, "s": S, "m": M,
   "head": "arcface"|"arcface_detached", "lr": LR, "momentum": MU, "weight_decay": WD,
   "clip": CLIP, "precision": "off"|"fp16"|"bf16", "device": "cpu"|"cuda"}
      -> {"params": backbone parameters}
  {"cmd": "train", "steps": N}  -> {"ms": [...], "cpu_ms": [...], "loss": last loss}
  {"cmd": "embed", "images": N, "batch": B, "reps": R} -> {"ms": [...], "cpu_ms": [...]}
      (eval mode, no_grad, u8 images normalised per batch, f(x) + f(flip(x)), L2-normalised, XNorm)
  {"cmd": "rss"} -> {"peak_rss_bytes": ..., "rss_bytes": ...} (peak so far, and now)
"""
import argparse
import ctypes
import json
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_memory():
    """The settings of crates/malloc (`FACEREC_MALLOC=keep`), before any large allocation."""
    libc = ctypes.CDLL("libc.so.6")
    ok = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(1 << 30))
    ok &= libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int((1 << 31) - 1))
    if not ok:
        raise SystemExit("mallopt refused the thresholds")


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--malloc", choices=["system", "keep"], default="system")
    ap.add_argument("--omp", choices=["default", "short", "passive"], default="default")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.malloc == "keep":
    keep_memory()
if ARGS.omp != "default":
    import os

    # Read by libgomp when torch loads it.
    if ARGS.omp == "short":
        os.environ["GOMP_SPINCOUNT"] = "3000"  # crates/process: omp::SHORT_SPIN
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backbone_oracle  # noqa: E402
import bench_losses_reference as heads  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Trainer:
    """One network, classifier, head and optimiser, and a fixed synthetic batch."""

    def __init__(self, req):
        self.device = torch.device(req.get("device", "cpu"))
        torch.manual_seed(0)
        self.model = backbone_oracle.build_from_model_table(req["model"]).to(self.device).train()
        size = int(req["model"].get("input_size", 112))
        emb = int(req["model"].get("embedding_size", 512))
        b, c = int(req["batch"]), int(req["classes"])
        self.x = torch.rand(b, 3, size, size, device=self.device) * 2 - 1
        self.y = torch.randint(c, (b,), device=self.device)
        # arcface_torch's classifier weight: N(0, 0.01), cosines of normalised rows.
        self.weight = torch.nn.Parameter(torch.normal(0, 0.01, (c, emb), device=self.device))
        heads.S = float(req["s"])
        m = float(req["m"])
        self.head = {
            "arcface": lambda cos, y: heads.arcface_exact(cos, y, m),
            "arcface_detached": lambda cos, y: heads.arcface_detached(cos, y, m),
        }[req["head"]]
        self.opt = torch.optim.SGD(
            [{"params": self.model.parameters()}, {"params": [self.weight]}],
            lr=float(req["lr"]),
            momentum=float(req["momentum"]),
            weight_decay=float(req["weight_decay"]),
        )
        self.clip = float(req["clip"])
        self.precision = req.get("precision", "off")
        # fp16 as arcface_torch trains it: a GradScaler around backward and step.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def loss(self):
        if self.precision == "off":
            emb = self.model(self.x)
        else:
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            with torch.autocast(self.device.type, dtype=dtype):
                emb = self.model(self.x)
            emb = emb.float()
        cos = F.linear(F.normalize(emb), F.normalize(self.weight)).clamp(-1, 1)
        return F.cross_entropy(self.head(cos, self.y), self.y)

    def step(self):
        loss = self.loss()
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.scaler.step(self.opt)
            self.scaler.update()
        self.opt.zero_grad()
        return loss.item()

    def train(self, steps):
        ms, cpu, loss = [], [], float("nan")
        for _ in range(steps):
            sync(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = self.step()
            sync(self.device)
            ms.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        return {"ms": ms, "cpu_ms": cpu, "loss": loss}

    def embed(self, n, batch, reps):
        """Eval-mode flip-test embeddings of n random u8 images, as facerec's `eval` computes them."""
        size = self.x.shape[-1]
        gen = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen).to(self.device)
        self.model.eval()
        ms, cpu = [], []
        try:
            for _ in range(reps):
                sync(self.device)
                t0, c0 = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    chunks, norm_sum = [], 0.0
                    for start in range(0, n, batch):
                        x = (images[start:start + batch].float() / 255.0 - 0.5) / 0.5
                        out, out_flip = self.model(x), self.model(x.flip(3))
                        norm_sum += float(out.double().norm(dim=1).sum() + out_flip.double().norm(dim=1).sum())
                        chunks.append(F.normalize(out + out_flip).cpu())
                    emb = torch.cat(chunks)
                    assert math.isfinite(norm_sum) and emb.shape[0] == n
                sync(self.device)
                ms.append((time.perf_counter() - t0) * 1e3)
                cpu.append((time.process_time() - c0) * 1e3)
        finally:
            self.model.train()
        return {"ms": ms, "cpu_ms": cpu}


def main():
    torch.set_num_threads(ARGS.threads)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "malloc": ARGS.malloc, "omp": ARGS.omp}), flush=True)
    trainer = None
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "setup":
            trainer = None  # free the previous network first
            trainer = Trainer(req)
            reply = {"params": trainer.params}
        elif cmd == "train":
            reply = trainer.train(int(req["steps"]))
        elif cmd == "embed":
            reply = trainer.embed(int(req["images"]), int(req["batch"]), int(req["reps"]))
        elif cmd == "rss":
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            reply = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_bytes": rss}
        else:
            raise SystemExit(f"unknown request {cmd!r}")
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
