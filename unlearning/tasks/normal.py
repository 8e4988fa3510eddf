"""Surface normals: 1 - cosine; mean/median angle, A11.25, A22.5, A30."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Task

THRESHOLDS = (11.25, 22.5, 30.0)


class Normal(Task):
    name = "normal"
    metrics = {"mean_angle": -1, "median_angle": -1, "a11": +1, "a22": +1, "a30": +1}

    def out_channels(self, num_classes):
        return 3

    def activate(self, raw):
        return F.normalize(raw, dim=1, eps=1e-6)

    def valid(self, target):
        return target.abs().sum(1) > 0

    def pixel_loss(self, pred, target):
        return 1.0 - (pred * target).sum(1), self.valid(target)

    def metric_state(self):
        return {"angles": []}

    def update_metrics(self, state, pred, target):
        valid = self.valid(target)
        cos = (F.normalize(pred.double(), dim=1) * target.double()).sum(1)[valid].clamp(-1.0, 1.0)
        state["angles"].append(torch.rad2deg(torch.acos(cos)).float().cpu())

    def finalize_metrics(self, state):
        angles = torch.cat(state["angles"]) if state["angles"] else torch.zeros(0)
        if angles.numel() == 0:  # no valid pixel measured: no value (0° would read as perfect)
            return {k: float("nan") for k in self.metrics}
        # torch.median returns the lower middle for even counts; use the true median.
        median = float(angles.double().quantile(0.5)) if angles.numel() < 2**24 else float(angles.median())
        out = {"mean_angle": float(angles.double().mean()), "median_angle": median}
        for key, t in zip(("a11", "a22", "a30"), THRESHOLDS):
            out[key] = float((angles < t).double().mean())
        return out
