"""Semantic segmentation: cross-entropy (ignore -1); mIoU and pixel accuracy.

mIoU is the mean IoU over the classes that occur in the ground truth of the set
scored (one confusion matrix over the set; ignore pixels left out). A pixel
predicted as a class the set does not contain still counts: it is a miss of its
true class. Code that averages over every class with a non-zero union (MTAN's,
for instance) also scores such a predicted-only class as IoU 0; on a test set,
where every class occurs, the two agree; on a few images (a request's forgotten
instances) this one does not punish the same error twice."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Task

IGNORE = -1


class Segmentation(Task):
    name = "segmentation"
    metrics = {"miou": +1, "pixel_acc": +1}

    def out_channels(self, num_classes: int | None) -> int:
        if not num_classes:
            raise ValueError("segmentation needs num_classes")
        return num_classes

    def valid(self, target):
        return target != IGNORE

    def pixel_loss(self, pred, target):
        valid = self.valid(target)
        loss = F.cross_entropy(pred, target.clamp_min(0), reduction="none")
        return loss, valid

    def metric_state(self):
        # nonfinite: a logit that is NaN or infinite was seen; argmax would still pick a class
        # (NaN's), so the confusion matrix alone would score a diverged head as a poor one
        return {"confusion": None, "nonfinite": False}

    def update_metrics(self, state, pred, target):
        num_classes = pred.shape[1]
        if state["confusion"] is None:
            state["confusion"] = torch.zeros(num_classes, num_classes, dtype=torch.long)
        valid = self.valid(target)
        # only labelled pixels count, as depth's and normals' metrics read only valid ones
        if not bool(torch.isfinite(pred).all(1)[valid].all()):
            state["nonfinite"] = True
        label = pred.argmax(1)
        truth = target[valid].long().cpu()
        if truth.numel() and (int(truth.min()) < 0 or int(truth.max()) >= num_classes):
            # named here: it failed inside the confusion matrix's view (a checkpoint of another dataset)
            raise ValueError(f"segmentation labels span [{int(truth.min())}, {int(truth.max())}] but the prediction "
                             f"has {num_classes} classes: labels are -1 (ignore) or a class of the prediction")
        idx = truth * num_classes + label[valid].long().cpu()
        state["confusion"] += torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)

    def finalize_metrics(self, state):
        if state["confusion"] is None or int(state["confusion"].sum()) == 0:
            # nothing measured (no batch, or no labelled pixel): no value, as depth and normals;
            # 0 would read as a useless model (and an error of 0 as a perfect one)
            return {"miou": float("nan"), "pixel_acc": float("nan")}
        if state.get("nonfinite"):  # as depth's and normals' metrics of such predictions are
            return {"miou": float("nan"), "pixel_acc": float("nan")}
        conf = state["confusion"].double()
        tp = conf.diag()
        total = conf.sum()
        union = conf.sum(0) + conf.sum(1) - tp
        present = conf.sum(1) > 0  # classes that occur in the ground truth of the set
        iou = tp[present] / union[present]
        return {
            "miou": float(iou.mean()),
            "pixel_acc": float(tp.sum() / total),
        }
