"""The description of a task: its head, its loss, its metrics and their directions.

Everything else (training, unlearning, evaluation, UIS) reads this description;
a task is defined once, in one file.
"""
from __future__ import annotations

from typing import Any

import torch


class Task:
    """One dense prediction task.

    Subclasses set ``name`` and ``metrics`` (metric name -> direction, +1 when
    higher is better, -1 otherwise) and implement the loss and metric hooks.
    Targets follow the common preprocessed formats: segmentation labels are
    long with -1 = ignore; depth is (1,H,W) with 0 = invalid; normals are
    (3,H,W) unit vectors with an all-zero vector = invalid. A depth or normal
    that is not finite (NaN, inf) is invalid too.
    """

    name: str = ""
    metrics: dict[str, int] = {}

    def out_channels(self, num_classes: int | None) -> int:
        raise NotImplementedError

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        """Map the head's raw output to a prediction in target space."""
        return raw

    def valid(self, target: torch.Tensor) -> torch.Tensor:
        """The pixels that carry a label, (B,H,W) bool (read off the target alone)."""
        raise NotImplementedError

    def labelled(self, target: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the samples with at least one labelled pixel. A sample without
        any has no loss to measure: :func:`unlearning.losses.per_sample_losses` gives
        it NaN, as for a cell that is not supervised, and the metrics skip it."""
        return self.valid(target).flatten(1).any(1)

    def pixel_loss(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel loss (B,H,W) and validity mask (B,H,W) for an activated prediction."""
        raise NotImplementedError

    def sample_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over each sample's valid pixels, shape (B,). Samples without
        any valid pixel get 0 (training sums it harmlessly; measurements mask such
        samples out with :meth:`labelled`)."""
        loss, valid = self.pixel_loss(pred, target)
        # where, not a product: an unlabelled pixel's loss may be inf or NaN (an ignored pixel
        # under an inf logit), and 0 * inf = NaN would make the whole sample's loss NaN
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        count = valid.to(loss.dtype).flatten(1).sum(1)
        return loss.flatten(1).sum(1) / count.clamp_min(1.0)

    # Metrics accumulate over a set of samples, then finalize to numbers.
    def metric_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def update_metrics(self, state: dict[str, Any], pred: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def finalize_metrics(self, state: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def compute_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Metrics of one batch treated as the whole set."""
        state = self.metric_state()
        self.update_metrics(state, pred, target)
        return self.finalize_metrics(state)
