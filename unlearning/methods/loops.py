"""The pieces the baseline unlearning methods share: config merging, seeded
retain batches, the forget loss on exactly the forget cells, and one generic
update loop (zero grads -> the method fills them -> clip -> optimiser step).

A method file reads top to bottom: it builds its per-step gradient function and
hands it to :func:`run_update_loop`. Nothing here knows a particular method.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch

from ..data.base import Batch, MultiTaskDataset
from ..losses import cell_losses, measured_cells, supervised_loss
from ..tasks import get_task
from .base import UnlearnData


def merged_config(defaults: dict, config: dict | None) -> dict:
    """The method's defaults overridden by ``config`` (unknown keys are kept: a
    caller may pass shared keys such as ``train`` that only some methods read)."""
    cfg = dict(defaults)
    cfg.update(config or {})
    return cfg


def working_copy(model: torch.nn.Module, data: UnlearnData) -> torch.nn.Module:
    """A deep copy of the caller's model on ``data.device``, in training mode, every
    parameter requiring a gradient (a caller may hand over a model frozen for serving,
    ``requires_grad_(False)``: its copy must still be trainable). Methods only ever
    modify this copy."""
    student = copy.deepcopy(model).to(data.device)
    student.train()
    student.requires_grad_(True)
    return student


def in_callers_mode(student: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """``student`` put in the training or evaluation mode of the caller's ``model`` (a method
    works on its copy in training mode, :func:`working_copy`; what it returns is the caller's
    model unlearned, in the mode the caller had it). The model's GroupNorm and absence of
    dropout make the mode change nothing in its outputs."""
    return student.train(model.training)


def generator(data: UnlearnData, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``data.seed`` (all sampling goes through it,
    so a method's run is reproducible without touching torch's global RNG)."""
    g = torch.Generator()
    g.manual_seed(int(data.seed) * 1_000_003 + salt)
    return g


def take(batch: Batch, rows: torch.Tensor) -> Batch:
    """The given rows of a batch."""
    rows = rows.to(batch.images.device)
    return Batch(
        batch.index[rows.to(batch.index.device)],
        batch.images[rows],
        {t: v[rows] for t, v in batch.targets.items()},
        {t: v[rows] for t, v in batch.has.items()},
    )


class RetainBatches:
    """Seeded random batches of the retain data, cycling through shuffled epochs.
    Only instances with at least one supervised cell are in ``retain``; the
    batch's ``has`` masks the erased cells (partial mode) out of every loss.

    An epoch's last, short batch is filled from the next epoch's shuffle with
    instances it does not hold: a batch never holds an instance twice (it did,
    counting that instance double in the batch's loss), and every instance is
    still drawn once per epoch."""

    def __init__(self, retain: MultiTaskDataset, batch_size: int, gen: torch.Generator, device):
        if len(retain) == 0:
            raise ValueError("no retained data: nothing to repair or distil on")
        self.retain = retain
        self.batch_size = max(1, min(int(batch_size), len(retain)))
        self.gen = gen
        self.device = device
        self._order = torch.zeros(0, dtype=torch.long)

    def next(self) -> Batch:
        need = self.batch_size - len(self._order)
        if need > 0:
            perm = torch.randperm(len(self.retain), generator=self.gen)
            fill = (~torch.isin(perm, self._order)).nonzero().squeeze(1)[:need]
            rest = torch.ones(len(perm), dtype=torch.bool)
            rest[fill] = False
            idx, self._order = torch.cat([self._order, perm[fill]]), perm[rest]
        else:
            idx, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return self.retain.batch(idx).to(self.device)


class ForgetBatches:
    """The forget batch (``data.forget_batch()``: ``has`` marks exactly the forget
    cells); when there are more forgotten instances than ``batch_size``, seeded
    random subsets of them."""

    def __init__(self, data: UnlearnData, batch_size: int, gen: torch.Generator, device):
        self.full = data.forget_batch().to(device)
        self.tasks = data.forget_tasks
        self.batch_size = int(batch_size)
        self.gen = gen

    def __len__(self) -> int:
        return len(self.full.index)

    def next(self) -> Batch:
        n = len(self)
        if self.batch_size <= 0 or n <= self.batch_size:
            return self.full
        return take(self.full, torch.randperm(n, generator=self.gen)[: self.batch_size])


class DonorTargets:
    """The dense analogue of random labels: each forget cell ``(i, k)`` gets the
    task-``k`` target of a random retained cell ``(j, k)`` (another instance: the
    forget cell itself is not in ``retain``), drawn afresh at every call.

    A donor must carry at least one labelled pixel: an unlabelled target (depth
    all 0, labels all -1) would give the forget cell no loss at all. A forget task
    with no such donor is left out of the forget loss (dropped from ``has``) and
    named in ``dropped``, which the methods put in their log."""

    def __init__(self, retain: MultiTaskDataset, tasks: Iterable[str], gen: torch.Generator):
        self.retain = retain
        self.gen = gen
        self.pools: dict[str, torch.Tensor] = {}
        self.dropped: list[str] = []
        for t in tasks:
            usable = retain.available[:, retain.tasks.index(t)] & get_task(t).labelled(retain.targets[t])
            pool = usable.nonzero().flatten()
            if len(pool):
                self.pools[t] = pool
            else:
                self.dropped.append(t)

    def __call__(self, batch: Batch) -> Batch:
        targets = dict(batch.targets)
        has = dict(batch.has)
        for t in self.dropped:
            has[t] = torch.zeros_like(has[t])
        for t, pool in self.pools.items():
            donors = pool[torch.randint(len(pool), (len(batch.index),), generator=self.gen)]
            targets[t] = self.retain.targets[t][donors].to(batch.targets[t].device)
        return Batch(batch.index, batch.images, targets, has)


def forget_loss(model, batch: Batch, tasks: Iterable[str]) -> torch.Tensor:
    """Sum over the forget tasks of the mean loss over the forget cells. Only the
    forget tasks' heads are run, so protected heads get no gradient from it."""
    losses = cell_losses(model, batch, list(tasks))
    return supervised_loss(losses, {t: batch.has[t] for t in losses})


def retain_loss(model, batch: Batch) -> torch.Tensor:
    """Sum over tasks of the mean loss over the batch's supervised (retained) cells that
    carry a labelled pixel (as training's: :func:`~unlearning.losses.measured_cells`)."""
    return supervised_loss(cell_losses(model, batch), measured_cells(batch, model.tasks))


def forget_task_parameters(model, tasks: Iterable[str]) -> list[torch.nn.Parameter]:
    """The shared encoder plus the heads of ``tasks``: everything a forget-only
    signal can reach (protected heads are left out, hence bit-identical)."""
    params = list(model.shared_parameters())
    for t in tasks:
        params += model.head_parameters(t)
    return params


#: the ``optimizer`` values every method with one takes (:func:`make_optimizer`, interference_aware's stepper)
OPTIMIZERS = ("adam", "sgd")


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    """Adam (default) or SGD with momentum, from ``cfg['optimizer']``, ``cfg['lr']`` and, for
    SGD, ``cfg['momentum']`` (0.9 where absent: every method that builds its optimiser here
    has it in its DEFAULTS at 0.9, the value SGD always had; Adam ignores it)."""
    name = cfg.get("optimizer", "adam")
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg.get("momentum", 0.9))
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(map(repr, OPTIMIZERS))}")


def run_update_loop(
    params: list[torch.nn.Parameter],
    steps: int,
    fill_grads: Callable[[int], dict],
    optimizer: torch.optim.Optimizer,
    data: UnlearnData,
    grad_clip: float | None = None,
    edit_grads: Callable[[], None] | None = None,
    log_every: int = 5,
) -> list[dict]:
    """``steps`` optimiser updates. Each step: grads set to None, ``fill_grads(step)``
    populates ``.grad`` (usually ``loss.backward()``) and returns scalars to log,
    ``edit_grads`` may rewrite them (e.g. a saliency mask), the total norm is
    clipped to ``grad_clip`` (None or 0: not clipped), the optimiser steps. Parameters left without a
    gradient are not moved (Adam and SGD skip them). Returns the logged scalars
    of every ``log_every``-th step and of the last."""
    history = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        scalars = fill_grads(step)
        if edit_grads is not None:
            edit_grads()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, **{k: round(float(v.detach() if torch.is_tensor(v) else v), 6) for k, v in scalars.items()}})
        if data.progress is not None:
            data.progress((step + 1) / steps)
    optimizer.zero_grad(set_to_none=True)  # no stale gradients on the returned model
    return history


@torch.no_grad()
def forget_loss_value(model, data: UnlearnData) -> float:
    """:func:`forget_loss` on the whole forget batch, as a number (logged before and after)."""
    batch = data.forget_batch().to(data.device)
    return float(forget_loss(model, batch, data.forget_tasks))


def method_log(method: str, cfg: dict, steps: int, before: float, student, data: UnlearnData, **extra) -> dict:
    """The log every baseline returns: its name, config and step count, the forget loss
    before and after (see :func:`forget_loss_value`), and method-specific ``extra``."""
    return {
        "method": method,
        "config": cfg,
        "steps": steps,
        **extra,
        "forget_loss_before": before,
        "forget_loss_after": forget_loss_value(student, data),
    }
