"""Per-cell losses of a multi-task model: the one place training, unlearning and evaluation get them."""
from __future__ import annotations

import torch

from .data.base import Batch
from .tasks import get_task


def cell_losses(model, batch: Batch, tasks=None) -> dict[str, torch.Tensor]:
    """Per-sample loss (B,) of every task in ``tasks`` (default: the model's), whether or not
    the cell is supervised; callers mask with ``batch.has``."""
    tasks = model.tasks if tasks is None else list(tasks)
    preds = model(batch.images, tasks)
    return {t: get_task(t).sample_loss(preds[t], batch.targets[t]) for t in tasks}


def supervised_loss(losses: dict[str, torch.Tensor], has: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over tasks of the mean loss over the cells ``has`` marks (a task with none adds 0).
    For a loss of the targets pass :func:`measured_cells`: a supervised cell without a
    labelled pixel has a loss of 0 that, counted in the mean, shrank its task's loss."""
    total = None
    for t, loss in losses.items():
        mask = has[t].to(loss.dtype)
        # where, not a product: an unsupervised cell's loss may be NaN or inf, and 0 * inf = NaN
        term = torch.where(has[t].bool(), loss, torch.zeros_like(loss)).sum() / mask.sum().clamp_min(1.0)
        total = term if total is None else total + term
    return total


def measured(batch: Batch, task: str) -> torch.Tensor:
    """(B,) bool: the cells of ``task`` in ``batch`` that have a loss to measure, i.e. that
    are supervised and carry at least one labelled pixel. A supervised cell whose every
    pixel is invalid (depth 0, label -1) adds nothing to training; measured, its loss
    would be a fake 0 that the membership attack reads as the most member-like of all."""
    return batch.has[task] & get_task(task).labelled(batch.targets[task])


def measured_cells(batch: Batch, tasks) -> dict[str, torch.Tensor]:
    """:func:`measured` of every task in ``tasks``: the masks a loss of the targets is
    averaged over (training, the retain losses of the methods)."""
    return {t: measured(batch, t) for t in tasks}


def supervised_or_nan(loss: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Per-sample ``loss`` where the cell is supervised, NaN where it is not (erased or absent).

    NaN means "nothing to measure" and nothing else: a supervised cell whose loss is NaN (a
    model whose predictions went non-finite) gets +inf, the worst loss, so the membership
    attack and the forget losses count it instead of dropping it as unlabelled."""
    loss = torch.where(torch.isnan(loss), torch.full_like(loss, float("inf")), loss)
    return torch.where(has, loss, torch.full_like(loss, float("nan")))


@torch.no_grad()
def per_sample_losses(model, dataset, indices=None, batch_size: int = 64, device=None) -> dict[str, torch.Tensor]:
    """Per-sample losses (N,) per task on ``dataset`` (NaN where the cell is not supervised
    or has no labelled pixel: :func:`measured`)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    indices = list(range(len(dataset))) if indices is None else list(indices)
    out: dict[str, list[torch.Tensor]] = {t: [] for t in dataset.tasks}
    for start in range(0, len(indices), batch_size):
        batch = dataset.batch(indices[start : start + batch_size]).to(device)
        for t, loss in cell_losses(model, batch, dataset.tasks).items():
            out[t].append(supervised_or_nan(loss, measured(batch, t)).cpu())
    model.train(was_training)
    return {t: torch.cat(v) if v else torch.zeros(0) for t, v in out.items()}
