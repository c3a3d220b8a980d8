"""Training metrics: sums over micro-batches and ranks, and the progress line."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .progress import duration


class MetricSums:
    """Sums of per-batch metrics, reduced over micro-batches and ranks in one all-reduce."""

    def __init__(self, k: int, device: torch.device = torch.device("cpu")):
        self.k, self.device = k, device  # collectives run on the device (NCCL needs CUDA tensors)
        self.v = torch.zeros(6 + 2 * k, dtype=torch.float64)  # batches, loss, ce_std*n, n_std, ce_sat*n, n_sat, hits[k], count[k]
        self.tokens = 0

    def add(self, m: dict, tokens: int, weight: float = 1.0) -> None:
        count = torch.tensor(m["sat_count"], dtype=torch.float64)
        acc = torch.tensor([0.0 if math.isnan(a) else a for a in m["sat_acc"]], dtype=torch.float64)
        head = [1.0, m["loss"], m["ce_std"] * m["n_std"], m["n_std"], m["ce_sat"] * m["n_sat"], m["n_sat"]]
        self.v += weight * torch.cat([torch.tensor(head, dtype=torch.float64), acc * count, count])
        self.tokens += int(weight * tokens)

    def reduce(self, prefix: str = "") -> dict:
        v = torch.cat([self.v, torch.tensor([float(self.tokens)], dtype=torch.float64)]).to(self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(v)
        v = v.cpu()
        k = self.k
        hits, count = v[6 : 6 + k], v[6 + k : 6 + 2 * k]
        out = {
            f"{prefix}loss": float(v[1] / max(v[0], 1)),
            f"{prefix}ce_std": float(v[2] / max(v[3], 1)),
            f"{prefix}ce_sat": float(v[4] / max(v[5], 1)),
        }
        for i in range(k):
            out[f"{prefix}sat_acc_{i + 1}"] = float(hits[i] / count[i]) if count[i] else float("nan")
        out[f"{prefix}tokens"] = int(v[-1])
        return out


def progress_line(m: dict, total_steps: int, eta_s: float) -> str:
    accs = " ".join(f"{m[key]:.2f}" for key in sorted(k for k in m if k.startswith("sat_acc_")))
    line = (f"step {m['step']}/{total_steps} | loss {m['loss']:.3f} | ce_std {m['ce_std']:.3f} | ce_sat {m['ce_sat']:.3f}"
            f" | sat_acc {accs} | {m['tokens_per_s']:.0f} tok/s | {m['step_s']:.1f} s/step | eta {duration(eta_s)}"
            f" | lr {m['lr']:.2e}")
    if "val_loss" in m:
        val_accs = " ".join(f"{m[key]:.2f}" for key in sorted(k for k in m if k.startswith("val_sat_acc_")))
        line += f" | val_loss {m['val_loss']:.3f} val_sat_acc {val_accs}"
    return line
