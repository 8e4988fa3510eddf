"""Unlearning metrics on plain numbers and tensors (no model here): UIS, MIA AUC, forget gap.

These are the contracts of design §3; benchmarks and checks read their names
and values. :mod:`unlearning.evaluate` runs the models and feeds these.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from .tasks import get_task

# A UIS group is named by (level, task, set): level "task" for task-level
# interference (non-target tasks of the forgotten instances), "inst" for
# instance-level interference (retained training sample, test set).
GroupKey = tuple[str, str, str]
LEVELS = ("task", "inst")


def relative_degradation(before: Mapping[str, float], after: Mapping[str, float], directions: Mapping[str, int]) -> float:
    """d_g of design §3, in percent: the mean over metrics ``m`` of ``directions`` of
    ``max(0, s_m * (m0 - mu) / |m0|) * 100``.

    ``before`` holds the original model's metrics (m0), ``after`` the unlearned
    model's (mu), ``directions`` +1 when higher is better, -1 otherwise.
    Improvements count 0 (clipped). A metric with ``m0 == 0``, where the ratio is
    undefined, counts its limit: 0 when higher is better (mIoU 0 of a useless
    original model has no utility to lose), and when lower is better 0 if ``mu``
    is 0 too, else infinity (an error of exactly 0 was perfect, and any error is
    a total loss of it; as :func:`forget_gap` counts ``L_r == 0``). A NaN ``mu`` (a diverged model)
    makes the result NaN rather than silently 0, and an infinite one makes it
    infinite. An infinite ``m0`` (an original model that had already diverged) gives no
    ratio to read: NaN, not the 0 that ``max(0, inf / inf)`` made of it.
    """
    if not directions:
        raise ValueError("no metrics to compare")
    if any(math.isnan(float(before[m])) or math.isnan(float(after[m])) or math.isinf(float(before[m]))
           for m in directions):
        return float("nan")  # whatever another metric's change (an infinite one included)
    total = 0.0
    for m, sign in directions.items():
        m0, mu = float(before[m]), float(after[m])
        if m0 == 0.0:
            if sign < 0 and mu > 0.0:
                return float("inf")
            continue
        change = sign * (m0 - mu) / abs(m0)
        total += max(0.0, change)  # max(0, inf) is inf: a blow-up stays visible
    return total / len(directions) * 100.0


def group_degradations(
    groups_before: Mapping[GroupKey, Mapping[str, float]],
    groups_after: Mapping[GroupKey, Mapping[str, float]],
    directions: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[GroupKey, float]:
    """d_g for every group. Keys are ``(level, task, set)``; ``directions`` maps a task
    to its metric directions (default: the task registry's)."""
    if set(groups_before) != set(groups_after):
        raise ValueError(
            f"groups differ: only before {sorted(set(groups_before) - set(groups_after))}, "
            f"only after {sorted(set(groups_after) - set(groups_before))}"
        )
    out = {}
    for key in groups_before:
        level, task, _ = key
        if level not in LEVELS:
            raise ValueError(f"group {key!r}: level must be one of {LEVELS}")
        dirs = directions[task] if directions is not None else get_task(task).metrics
        out[key] = relative_degradation(groups_before[key], groups_after[key], dirs)
    return out


def uis(
    groups_before: Mapping[GroupKey, Mapping[str, float]],
    groups_after: Mapping[GroupKey, Mapping[str, float]],
    directions: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, float]:
    """The unlearning interference score (percent, lower is better) of design §3.

    ``groups_before``/``groups_after`` map each group ``(level, task, set)`` to the
    original/unlearned model's metrics on it, e.g.
    ``{("task", "depth", "forgotten"): {...}, ("inst", "depth", "test"): {...}}``.
    Returns ``{"uis", "uis_task", "uis_inst"}``: the means of d_g over the
    task-level groups (0 when there are none, as in full-task mode), over the
    instance-level groups (0 when none), and over all groups, each group
    weighing the same.
    """
    d = group_degradations(groups_before, groups_after, directions)
    task = [v for (level, _, _), v in d.items() if level == "task"]
    inst = [v for (level, _, _), v in d.items() if level == "inst"]
    everything = task + inst

    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    return {"uis": mean(everything), "uis_task": mean(task), "uis_inst": mean(inst)}


def _finite_losses(x) -> torch.Tensor:
    """1-D float64 tensor without NaN (NaN marks an unsupervised cell in
    :func:`unlearning.losses.per_sample_losses`)."""
    t = torch.as_tensor(x, dtype=torch.float64).flatten().cpu()
    return t[~torch.isnan(t)]


def _auc_counts(members: torch.Tensor, nonmembers: torch.Tensor) -> torch.Tensor:
    """Per member: P(nonmember loss > member loss) + 0.5 P(tie) over the non-members."""
    ref, _ = torch.sort(nonmembers)
    n = ref.numel()
    below_or_equal = torch.searchsorted(ref, members, right=True)
    below = torch.searchsorted(ref, members, right=False)
    above = n - below_or_equal
    ties = below_or_equal - below
    return (above.double() + 0.5 * ties.double()) / n


def member_scores(member_losses, nonmember_losses) -> torch.Tensor:
    """Each member's contribution to :func:`mia_auc` (one task): ``P(non-member loss >
    its loss) + ½ P(tie)``, in member order (NaN for a NaN member loss; non-member
    NaNs are dropped). The AUC of a set of members is the mean of their scores."""
    members = torch.as_tensor(member_losses, dtype=torch.float64).flatten().cpu()
    nonmembers = _finite_losses(nonmember_losses)
    if nonmembers.numel() == 0:
        return torch.full_like(members, float("nan"))
    # NaN members are masked below; an infinite one stays infinite (nan_to_num's default
    # would make it the largest finite float, below an infinite non-member instead of tied)
    out = _auc_counts(members.nan_to_num(0.0, posinf=math.inf, neginf=-math.inf), nonmembers)
    return torch.where(torch.isnan(members), torch.full_like(out, float("nan")), out)


def mia_auc(member_losses, nonmember_losses) -> float:
    """AUC of the loss-threshold membership attack "lower loss => member".

    ``AUC = P(l_nonmember > l_member) + 0.5 * P(l_nonmember == l_member)`` over all
    (member, non-member) pairs: 1.0 when every member has a lower loss than
    every non-member, 0.5 when the attack cannot tell them apart. With one
    member it is that member's rank among the non-members.

    Either two 1-D sequences/tensors (one task), or two dicts task -> losses:
    then every member cell (a forgotten cell of task k) is compared only with
    the non-member losses of the same task, and the result is the mean over
    member cells, which equals the per-task AUCs weighted by each task's
    number of member cells (losses of different tasks are not on one scale,
    so pooling them would measure the tasks, not membership). NaN losses are
    dropped; tasks without members or non-members are skipped; NaN when
    nothing is left to compare.
    """
    if isinstance(member_losses, Mapping) != isinstance(nonmember_losses, Mapping):
        raise TypeError("pass both losses as dicts task -> losses, or both as sequences")
    if not isinstance(member_losses, Mapping):
        member_losses, nonmember_losses = {"": member_losses}, {"": nonmember_losses}
    scores = []
    for task, members in member_losses.items():
        members = _finite_losses(members)
        nonmembers = _finite_losses(nonmember_losses.get(task, []))
        if members.numel() == 0 or nonmembers.numel() == 0:
            continue
        scores.append(_auc_counts(members, nonmembers))
    if not scores:
        return float("nan")
    return float(torch.cat(scores).mean())


def forget_gap(unlearned_losses, retrained_losses) -> float:
    """Mean over forgotten tasks of ``|L_u - L_r| / L_r``, where L is a model's mean
    loss over the forgotten cells of that task (design §3; benchmarks only).

    Dicts task -> per-cell losses (or two sequences for one task). 0 when the
    unlearned model matches the gold standard on the forgotten cells. A task
    with ``L_r == 0`` counts 0 if ``L_u == 0`` too, else infinity. NaN entries
    are dropped; NaN when no task has losses on both sides.
    """
    if isinstance(unlearned_losses, Mapping) != isinstance(retrained_losses, Mapping):
        raise TypeError("pass both losses as dicts task -> losses, or both as sequences")
    if not isinstance(unlearned_losses, Mapping):
        unlearned_losses, retrained_losses = {"": unlearned_losses}, {"": retrained_losses}
    gaps = []
    for task, lu in unlearned_losses.items():
        if task not in retrained_losses:
            raise KeyError(f"no retrained losses for task {task!r}")
        lu, lr = _finite_losses(lu), _finite_losses(retrained_losses[task])
        if lu.numel() == 0 or lr.numel() == 0:
            continue
        mu, mr = float(lu.mean()), float(lr.mean())
        if mr == 0.0:
            gaps.append(0.0 if mu == 0.0 else float("inf"))
        else:
            gaps.append(abs(mu - mr) / abs(mr))
    return sum(gaps) / len(gaps) if gaps else float("nan")


__all__ = ["GroupKey", "relative_degradation", "group_degradations", "uis", "mia_auc", "forget_gap"]
