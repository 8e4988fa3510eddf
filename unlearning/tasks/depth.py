"""Depth: masked L1 on valid pixels (depth > 0); abs err, rel err, delta<1.25."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Task


class Depth(Task):
    name = "depth"
    metrics = {"abs_err": -1, "rel_err": -1, "delta1": +1}

    def out_channels(self, num_classes):
        return 1

    def activate(self, raw):
        # Depth is positive; softplus keeps gradients alive near zero.
        return F.softplus(raw)

    def valid(self, target):
        # finite too: +inf (a "no return" some datasets store) would give an infinite loss, and
        # the npy loader reads it as invalid, as it does NaN, 0 and negative depth
        depth = target[:, 0]
        return (depth > 0) & torch.isfinite(depth)

    def pixel_loss(self, pred, target):
        return (pred[:, 0] - target[:, 0]).abs(), self.valid(target)

    def metric_state(self):
        return {"abs": 0.0, "rel": 0.0, "delta": 0.0, "n": 0.0}

    def update_metrics(self, state, pred, target):
        valid = self.valid(target)
        p = pred[:, 0][valid].double()
        t = target[:, 0][valid].double()
        state["abs"] += float((p - t).abs().sum())
        state["rel"] += float(((p - t).abs() / t).sum())
        ratio = torch.maximum(p / t, t / p.clamp_min(1e-12))
        state["delta"] += float((ratio < 1.25).sum())
        state["n"] += float(valid.sum())

    def finalize_metrics(self, state):
        n = state["n"]
        if n == 0:  # no valid pixel measured: no value (0 would read as a perfect prediction)
            return {k: float("nan") for k in self.metrics}
        return {"abs_err": state["abs"] / n, "rel_err": state["rel"] / n, "delta1": state["delta"] / n}
