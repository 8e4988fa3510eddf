"""Evaluate an unlearned model: per-task metrics on the UIS groups, UIS, MIA AUC, forget gap.

Groups (design §3, generalised to several requests at once):

- task-level: for each task k, the forgotten instances that keep task k
  (their cell (i, k) is supervised and not forgotten); empty in full-task mode;
- instance-level: for each task k, a deterministic sample of up to N retained
  training instances (never a forgotten one) and the test set.

What depends only on the model version (the original model's metrics on the
test set and on the retained sample, its per-sample losses on held-out data)
is cached in an :class:`EvalContext` that a worker can keep between jobs.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .data.base import Cell, MultiTaskDataset
from .losses import measured, per_sample_losses, supervised_or_nan
from .metrics import GroupKey, group_degradations, mia_auc, uis
from .metrics import forget_gap as forget_gap_metric
from .tasks import get_task

log = logging.getLogger(__name__)


def task_metrics(
    model,
    dataset: MultiTaskDataset,
    tasks: Sequence[str] | None = None,
    only_supervised: bool = True,
    device=None,
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of ``model`` on ``dataset``.

    With ``only_supervised`` (the default) a task is measured only on the
    cells still supervised (erased cells are not ground truth any more);
    otherwise on every instance's stored target. A task with no cell to
    measure is left out of the result rather than reported as a fake 0.
    """
    return _measure(model, dataset, tasks, only_supervised, device, batch_size, with_losses=False)[0]


def metrics_and_losses(
    model, dataset: MultiTaskDataset, device=None, batch_size: int = 64
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """:func:`task_metrics` and :func:`~unlearning.losses.per_sample_losses` of ``model`` on
    ``dataset`` from one forward pass over it (a job scores the test set for both: its
    UIS groups and the membership attack's non-members)."""
    return _measure(model, dataset, None, True, device, batch_size, with_losses=True)


@torch.no_grad()
def _measure(model, dataset, tasks, only_supervised, device, batch_size, with_losses):
    tasks = list(dataset.tasks if tasks is None else tasks)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    states = {t: get_task(t).metric_state() for t in tasks}
    counts = {t: 0 for t in tasks}
    losses: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset.batch(range(start, min(start + batch_size, len(dataset)))).to(device)
            # the cells with a loss to measure (supervised, a labelled pixel): losses are NaN
            # elsewhere, as per_sample_losses gives them; metrics read those cells, or,
            # without only_supervised, every stored target with a labelled pixel
            sup = {t: measured(batch, t) for t in tasks}
            rows_of = sup if only_supervised else {t: get_task(t).labelled(batch.targets[t]) for t in tasks}
            needed = [t for t in tasks if bool(rows_of[t].any())]
            preds = model(batch.images, needed) if needed else {}
            for t in tasks:
                if with_losses:
                    losses[t].append(supervised_or_nan(get_task(t).sample_loss(preds[t], batch.targets[t]),
                                                       sup[t]).cpu()
                                     if t in preds else torch.full(batch.has[t].shape, float("nan")))
                if t not in preds:
                    continue
                rows = rows_of[t]
                get_task(t).update_metrics(states[t], preds[t][rows], batch.targets[t][rows])
                counts[t] += int(rows.sum())
    finally:
        model.train(was_training)
    metrics = {t: get_task(t).finalize_metrics(states[t]) for t in tasks if counts[t] > 0}
    return metrics, ({t: torch.cat(v) if v else torch.zeros(0) for t, v in losses.items()} if with_losses else None)


def retained_sample(
    train: MultiTaskDataset, exclude: Iterable[str] = (), size: int = 64, seed: int = 0
) -> list[str]:
    """Up to ``size`` instance ids of ``train``, never one of ``exclude``.

    The order comes from a seeded permutation of all of ``train``, and the
    excluded ids are skipped, so the sample changes only where a request hits
    it: the original model's metrics on it can be cached per model version.
    """
    exclude = set(exclude)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = [train.instance_ids[i] for i in order if train.instance_ids[i] not in exclude]
    return ids[:size]


class EvalContext:
    """The original model's numbers for one model version, computed lazily and once.

    ``original``: the deployed model; ``train``: the data it reflects; ``test``:
    held-out data (MIA non-members, test-set groups). Keep it between jobs on
    the same version; build a new one for a new version.
    """

    def __init__(
        self,
        original,
        train: MultiTaskDataset,
        test: MultiTaskDataset,
        retained_sample_size: int = 64,
        seed: int = 0,
        device=None,
        batch_size: int = 64,
    ):
        self.original = original
        self.train = train
        self.test = test
        self.retained_sample_size = retained_sample_size
        self.seed = seed
        self.device = device
        self.batch_size = batch_size
        self._metrics: dict[tuple, dict[str, dict[str, float]]] = {}
        self._test_losses: dict[str, torch.Tensor] | None = None

    def sample_ids(self, forget_instances: Iterable[str] = ()) -> list[str]:
        """The retained training sample for a request that forgets ``forget_instances``."""
        return retained_sample(self.train, forget_instances, self.retained_sample_size, self.seed)

    def original_metrics(self, set_name: str, ids: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """The original model's :func:`task_metrics` on the test set (``ids`` None) or on
        the training instances ``ids``; cached by the set's content."""
        key = (set_name, tuple(ids) if ids is not None else None)
        if key not in self._metrics:
            if ids is None:
                self._score_test()
            else:
                self._metrics[key] = task_metrics(self.original, self.train.select(ids), device=self.device,
                                                  batch_size=self.batch_size)
        return self._metrics[key]

    def test_losses(self) -> dict[str, torch.Tensor]:
        """The original model's per-sample losses on the test set (NaN where not supervised)."""
        if self._test_losses is None:
            self._score_test()
        return self._test_losses

    def warm(self) -> "EvalContext":
        """Compute what depends on the model version alone: the test set's metrics and
        per-sample losses (one pass) and the metrics on the retained sample of a request
        that hits none of it. Returns ``self``."""
        self.original_metrics("test")
        self.original_metrics("retained", self.sample_ids())
        return self

    def per_version(self) -> "EvalContext":
        """A copy holding only the per-version entries (see :meth:`warm`), as a job finds
        the cache when no earlier job had its request: a request that forgets a sampled
        instance gets its own sample, and the original model's metrics on it are that
        job's work. Benchmarks that time or count jobs evaluate each one with such a copy,
        so a job's figure does not depend on which job ran before it."""
        clone = copy.copy(self)
        keep = {("test", None), ("retained", tuple(self.sample_ids()))}
        clone._metrics = {k: v for k, v in self._metrics.items() if k in keep}
        return clone

    def _score_test(self) -> None:
        # the test set's metrics and per-sample losses come from one pass over it
        metrics, self._test_losses = metrics_and_losses(self.original, self.test, self.device, self.batch_size)
        self._metrics.setdefault(("test", None), metrics)

    def check(self, original, train: MultiTaskDataset, test: MultiTaskDataset) -> None:
        """Refuse to reuse cached numbers of another model or other data."""
        if original is not self.original:
            raise ValueError("evaluation context was built for another original model")
        if not self.train.same_cells(train):
            raise ValueError("evaluation context was built for other training data")
        if test.instance_ids != self.test.instance_ids:
            raise ValueError("evaluation context was built for another test set")


def forget_cell_losses(model, train: MultiTaskDataset, forget_cells: Sequence[Cell], device=None,
                       batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per forgotten task, the model's losses on the forgotten cells of that task."""
    instances = list(dict.fromkeys(iid for iid, _ in forget_cells))
    losses = per_sample_losses(model, train, [train.index_of(i) for i in instances], batch_size, device)
    row = {iid: r for r, iid in enumerate(instances)}
    return losses_of_cells(losses, row.__getitem__, forget_cells)


def losses_of_cells(losses: dict[str, torch.Tensor], row_of: Callable[[str], int],
                    cells: Sequence[Cell]) -> dict[str, torch.Tensor]:
    """Per task, the losses of ``cells`` read off per-sample ``losses`` (task -> (N,)),
    whose row of an instance is ``row_of(instance_id)``."""
    out: dict[str, list[float]] = {}
    for iid, task in cells:
        out.setdefault(task, []).append(float(losses[task][row_of(iid)]))
    return {t: torch.tensor(v, dtype=torch.float64) for t, v in out.items()}


def membership_auc(model, train: MultiTaskDataset, forget_cells: Sequence[Cell], test: MultiTaskDataset, device=None,
                   batch_size: int = 64) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss-threshold attack's AUC on the forgotten cells against the same tasks'
    test losses under ``model``, and the forgotten cells' losses (per task)."""
    members = forget_cell_losses(model, train, forget_cells, device, batch_size)
    held = per_sample_losses(model, test, batch_size=batch_size, device=device)
    return mia_auc(members, held), members


def _nan_to_none(x: float | None) -> float | None:
    """``x``, or None where it is no number strict JSON holds (NaN, or the infinite loss of a
    diverged head: :func:`unlearning.losses.supervised_or_nan`)."""
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _measured_cells(supervised: torch.Tensor, targets: torch.Tensor, task: str) -> int:
    """How many of the cells ``supervised`` marks the metrics read: those with a labelled
    pixel (:func:`unlearning.losses.measured`); a group's ``n``. Only the marked rows'
    targets are read (a job's forgotten group is a few rows of the training set)."""
    rows = supervised.bool().nonzero().flatten()
    if rows.numel() == 0:
        return 0
    return int(get_task(task).labelled(targets[rows.to(targets.device)]).sum())


def evaluate_unlearning(
    original,
    unlearned,
    train: MultiTaskDataset,
    forget_cells: Sequence[Cell],
    test: MultiTaskDataset,
    retrained=None,
    context: EvalContext | None = None,
    retained_sample_size: int = 64,
    seed: int = 0,
    device=None,
    batch_size: int = 64,
    retrained_forget_losses: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """UIS, MIA AUC, forget gap and per-group per-task metrics of an unlearning job.

    ``train`` is the data ``original`` reflects (the forget cells still in it),
    ``forget_cells`` the cells erased now, ``test`` held-out data. ``retrained``
    (the gold standard, benchmarks only) adds ``mia_auc_retrain``,
    ``forget_gap`` and ``uis_retrain``; without it they are None. ``context``
    reuses the original model's cached numbers (its own sample size and seed
    then apply). ``retrained_forget_losses`` (without ``retrained``): the gold
    standard's losses on ``forget_cells`` per task, as :func:`membership_auc`
    returns them, give ``forget_gap`` without evaluating that model again.

    Returns plain Python values (floats: ``uis``, ``uis_task``, ``uis_inst`` and a group's
    ``degradation`` can be NaN or infinite, as :func:`~unlearning.metrics.relative_degradation`
    says; strict JSON writers map them, ``bench`` and the worker to null): ``uis``, ``uis_task``, ``uis_inst``,
    ``mia_auc`` (unlearned), ``mia_auc_original``, ``mia_auc_retrain``,
    ``forget_gap``, ``uis_retrain``, ``mode`` (full/partial), ``forget_tasks``,
    ``n_forget_cells``, ``n_forget_instances``, ``forget_loss`` (mean loss on
    the forgotten cells per task and model) and ``groups``: one entry per UIS
    group with its level, task, set, size, each model's metrics and d_g.
    ``mia_tasks``: the forgotten tasks the attack compared; a forgotten task with no
    labelled forgotten cell or no labelled held-out cell has no AUC and is left out of the
    ``mia_auc`` values (logged). An AUC with no task to compare is None.
    """
    if context is None:
        context = EvalContext(original, train, test, retained_sample_size, seed, device, batch_size)
    else:
        context.check(original, train, test)
    forget_cells = list(dict.fromkeys(train.check_cells(forget_cells)))  # a cell requested twice is one member
    if not forget_cells:
        raise ValueError("no forget cells to evaluate")
    forgotten = set(forget_cells)
    forget_instances = list(dict.fromkeys(iid for iid, _ in forget_cells))
    forget_tasks = [t for t in train.tasks if any(task == t for _, task in forget_cells)]

    models = {"original": original, "unlearned": unlearned}
    if retrained is not None:
        models["retrained"] = retrained
    from .job import JobInputError, check_model_matches  # the job module imports this one

    for name, model in models.items():  # a clear error, not one from inside the model's forward
        try:
            check_model_matches(model, train, test)
        except JobInputError as exc:
            raise ValueError(f"the {name} model: {exc}") from None

    # model name -> group (level, task, set) -> that model's metrics on the group
    metrics: dict[str, dict[GroupKey, dict[str, float]]] = {name: {} for name in models}
    sizes: dict[GroupKey, int] = {}

    # Task-level: for each task, the forgotten instances that keep it. Measured on a copy of
    # train in which only those cells remain supervised.
    keep = torch.zeros_like(train.available)
    for iid in forget_instances:
        i = train.index_of(iid)
        for k, t in enumerate(train.tasks):
            keep[i, k] = bool(train.available[i, k]) and (iid, t) not in forgotten
    if keep.any():
        rows = keep.any(1).nonzero().flatten().tolist()
        kept = MultiTaskDataset(
            train.name, train.tasks, train.images[rows], {t: v[rows] for t, v in train.targets.items()},
            [train.instance_ids[r] for r in rows], train.num_classes, keep[rows],
        )
        for name, model in models.items():
            for task, m in task_metrics(model, kept, device=device, batch_size=batch_size).items():
                metrics[name][("task", task, "forgotten")] = m
        for k, t in enumerate(train.tasks):
            n = _measured_cells(keep[:, k], train.targets[t], t)
            if n:
                sizes[("task", t, "forgotten")] = n

    # Instance-level: retained training sample and test set, every task.
    sample = context.sample_ids(forget_instances)
    sample_data = train.select(sample)
    heldout = {"original": context.test_losses()}  # the attack's non-members, per model
    for set_name, data, ids in (("retained", sample_data, sample), ("test", test, None)):
        for name, model in models.items():
            if name == "original":
                per_task = context.original_metrics(set_name, ids)
            elif set_name == "test":
                per_task, heldout[name] = metrics_and_losses(model, test, device, batch_size)
            else:
                per_task = task_metrics(model, data, device=device, batch_size=batch_size)
            for task, m in per_task.items():
                metrics[name][("inst", task, set_name)] = m
        for k, t in enumerate(data.tasks):
            n = _measured_cells(data.available[:, k], data.targets[t], t)
            if n:
                sizes[("inst", t, set_name)] = n

    scores = uis(metrics["original"], metrics["unlearned"])
    degradation = group_degradations(metrics["original"], metrics["unlearned"])
    uis_retrain = uis(metrics["original"], metrics["retrained"])["uis"] if retrained is not None else None

    # Forgetting: members are the forgotten cells, non-members the same task's test losses.
    member = {name: forget_cell_losses(m, train, forget_cells, device, batch_size) for name, m in models.items()}
    auc = {name: _nan_to_none(mia_auc(member[name], heldout[name])) for name in models}
    # the forgotten tasks the attack could compare (a labelled forgotten cell and a labelled
    # held-out cell: the data's, the same for every model); the others are not in the AUC
    def labelled(losses) -> bool:
        return losses is not None and bool((~torch.isnan(losses)).any())

    attacked = sorted(t for t, v in member["unlearned"].items() if labelled(v) and labelled(heldout["unlearned"].get(t)))
    if set(attacked) != set(member["unlearned"]):
        log.warning("membership attack: forgotten task(s) %s have no labelled %s cell; mia_auc compares %s only",
                    sorted(set(member["unlearned"]) - set(attacked)), "forgotten or held-out", attacked or "nothing")
    gold = member["retrained"] if retrained is not None else retrained_forget_losses
    # from the per-cell losses: a head whose loss went infinite makes the gap infinite (None),
    # where means already made JSON-safe would drop that task
    gap = _nan_to_none(forget_gap_metric(member["unlearned"], gold)) if gold is not None else None

    groups = []
    for key in metrics["original"]:
        level, task, set_name = key
        entry = {"level": level, "task": task, "set": set_name, "n": sizes.get(key, 0)}
        entry.update({name: metrics[name][key] for name in models})
        entry["degradation"] = degradation[key]
        groups.append(entry)

    return {
        **scores,
        "mia_auc": auc["unlearned"],
        "mia_auc_original": auc["original"],
        "mia_auc_retrain": auc.get("retrained"),
        "mia_tasks": attacked,
        "forget_gap": gap,
        "uis_retrain": uis_retrain,
        "mode": "partial" if bool(keep.any()) else "full",
        "forget_tasks": forget_tasks,
        "n_forget_cells": len(forget_cells),
        "n_forget_instances": len(forget_instances),
        "retained_sample_size": len(sample),
        "forget_loss": {
            # a cell without a labelled pixel has no loss (NaN): the mean is over the cells that have
            # one, and None (not NaN, which strict JSON and PostgreSQL's jsonb refuse) when none has
            name: {t: _nan_to_none(float(v.nanmean())) for t, v in losses.items()} for name, losses in member.items()
        },
        "groups": groups,
    }


__all__ = ["task_metrics", "metrics_and_losses", "retained_sample", "EvalContext", "evaluate_unlearning", "forget_cell_losses", "membership_auc"]
