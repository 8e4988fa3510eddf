"""What every unlearning method receives and returns.

One signature: ``method(model, data, config) -> (unlearned_model, log)``.
``model`` is the deployed model (the method may modify a copy, never the
caller's), ``data`` an :class:`UnlearnData`, ``config`` a plain dict of the
method's hyper-parameters (missing keys take the method's documented defaults),
``log`` a JSON-serialisable dict (steps, losses, what was skipped and why). The
returned model is in the caller's model's mode (``model.training``): a method
trains its copy in training mode and hands it back as the caller had it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..data.base import Cell, MultiTaskDataset
from ..tasks import get_task


class UnlearningDiverged(RuntimeError):
    """The method's run went non-finite (a step size far too large, say): there is no model
    to publish, and running the same job again gives the same result. Raised by a method
    whose update is no longer finite and by :func:`unlearning.job.run_unlearning_job`
    when the weights or the predictions it returns are not."""


@dataclass
class UnlearnData:
    """Everything a method may read.

    ``train``: the training data the deployed model reflects (earlier erasures
    already removed). ``forget_cells``: the cells to erase now (validated).
    ``retain``: ``train`` without the forget cells (what the gold standard is
    retrained on). ``heldout``: data the model never saw, used only for
    reference levels (e.g. the bounded forget signal's tau). ``cache``: a dict
    for what depends only on the model version (task subspaces, original
    per-sample losses); the caller may keep it between jobs on one version.
    """

    train: MultiTaskDataset
    forget_cells: list[Cell]
    retain: MultiTaskDataset
    heldout: MultiTaskDataset | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[float], None] | None = None  # called with a fraction in [0, 1]

    @property
    def forget_instances(self) -> list[str]:
        seen: dict[str, None] = {}
        for iid, _ in self.forget_cells:
            seen.setdefault(iid, None)
        return list(seen)

    @property
    def forget_tasks(self) -> list[str]:
        return [t for t in self.train.tasks if any(t == task for _, task in self.forget_cells)]

    def forget_batch(self):
        """The forgotten instances as one batch, with ``has`` marking exactly the forget cells
        that carry a labelled pixel (a cell without one never gave the model a gradient:
        there is nothing to forget, and its loss would be a fake 0 no method could raise)."""
        idx = [self.train.index_of(i) for i in self.forget_instances]
        batch = self.train.batch(idx)
        cells = set(self.forget_cells)
        for k, t in enumerate(self.train.tasks):
            asked = torch.tensor([(iid, t) in cells for iid in self.forget_instances], dtype=torch.bool,
                                 device=batch.targets[t].device)  # the data may live on the GPU (job.py)
            batch.has[t] = asked & get_task(t).labelled(batch.targets[t])
        return batch


Method = Callable[[torch.nn.Module, UnlearnData, dict], tuple[torch.nn.Module, dict]]
