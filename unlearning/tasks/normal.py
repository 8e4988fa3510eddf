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
        # finite too: a NaN component made the sum NaN (not > 0) but an infinite one passed,
        # and inf * 0 in the cosine gave a NaN loss; the npy loader reads both as invalid
        return (target.abs().sum(1) > 0) & torch.isfinite(target).all(1)

    def pixel_loss(self, pred, target):
        valid = self.valid(target)
        # zeroed where invalid: masking the loss alone left d(pred . target)/d(pred) = target,
        # so a NaN target gave the prediction a NaN gradient (0 * NaN); unchanged elsewhere
        target = torch.where(valid.unsqueeze(1), target, torch.zeros_like(target))
        return 1.0 - (pred * target).sum(1), valid

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
