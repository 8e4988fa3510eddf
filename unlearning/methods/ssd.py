"""Selective Synaptic Dampening (Foster et al. 2024): no training. Parameters
far more important to the forget cells than to the training data as a whole
are shrunk towards zero.

Importance is the diagonal empirical Fisher, ``I = mean_i (∂ℓ_i/∂θ)²`` over
per-sample gradients: ``I_f`` over the forgotten instances with ``ℓ_i`` the sum
of their forget cells' losses (forget tasks' heads only), ``I_d`` over the full
training data ``data.train`` (a seeded subset of at most ``fisher_samples``
instances) with ``ℓ_i`` the sum of the instance's supervised cells' losses.
Then, per weight: where ``I_f > α I_d``, ``θ ← β θ`` with
``β = min(λ I_d / I_f, 1)``.

(The reference code accumulates squared gradients of mini-batches; with one
or a few forgotten instances against batches of the training set that
compares different noise levels, so per-sample gradients are used on both
sides here.) ``I_d`` depends only on the model version and the training data
and is cached in ``data.cache``, keyed by the training set's cells and by a
fingerprint of the model's weights (:func:`weights_fingerprint`): two models
on one cache never share it.

Protected heads have ``I_f = 0``, are never selected and stay bit-identical in
a partial-task request (``PROTECTS_HEADS``).
"""
from __future__ import annotations

import torch

from ..losses import cell_losses, supervised_loss
from ..model import weights_fingerprint
from . import loops

PROTECTS_HEADS = True

# Chosen by benchmarks/sweep_baselines.py (docs/baselines.md).
DEFAULTS = {
    "alpha": 1.0,  # selection weighting: dampen where I_f > alpha * I_d
    "lambda": 0.5,  # dampening constant: beta = min(lambda * I_d / I_f, 1)
    "fisher_samples": 256,  # at most this many training instances for I_d
}
_SUBSET_SEED = 4  # loops.generator's seed for data.seed 0 and salt 4


def fisher_diagonal(model, batches, tasks_of, progress=None) -> dict[str, torch.Tensor]:
    """Mean over single-sample batches of the squared gradient of their supervised loss
    (a batch with no task to measure, ``tasks_of`` empty, is left out of the mean)."""
    importance = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batches = list(batches)
    used = 0
    for i, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        tasks = tasks_of(batch)
        if tasks:
            used += 1
            loss = supervised_loss(cell_losses(model, batch, tasks), {t: batch.has[t] for t in tasks})
            loss.backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    importance[n] += p.grad.detach() ** 2
        if progress is not None:
            progress((i + 1) / len(batches))
    model.zero_grad(set_to_none=True)
    return {n: v / max(used, 1) for n, v in importance.items()}


def _importance_key(model, data, n_samples: int) -> tuple:
    # by the training set's cells: by their counts, a training set with another instance
    # erased read the importances of the data that still held it; by the weights: a cache
    # is meant to be kept per model version, but nothing checked it, and a second model on
    # one cache read the first one's I_d
    return ("ssd_train_importance", data.train.name, data.train.cells_key(), int(n_samples),
            weights_fingerprint(model))


def train_importance(model, data, n_samples: int) -> dict[str, torch.Tensor]:
    """``I_d`` over (a fixed seeded subset of) ``data.train``, cached per training set, size
    and weights: it depends only on the model version, not on the request (the subset is the
    one every request drew at seed 0 before it was cached per version)."""
    key = _importance_key(model, data, n_samples)
    if key in data.cache:
        return data.cache[key]
    n = len(data.train)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(_SUBSET_SEED))[: min(n, int(n_samples))].sort().values
    batches = (data.train.batch([int(i)]).to(data.device) for i in rows)
    importance = fisher_diagonal(model, batches, lambda b: [t for t in data.train.tasks if bool(b.has[t][0])])
    data.cache[key] = importance
    return importance


def prepare(model, data, config: dict | None = None) -> None:
    """``I_d`` into ``data.cache`` (what depends only on the model version), computed on a
    working copy in training mode, as :func:`unlearn` computes it."""
    n_samples = loops.merged_config(DEFAULTS, config)["fisher_samples"]
    if _importance_key(model, data, n_samples) not in data.cache:
        train_importance(loops.working_copy(model, data), data, n_samples)


@torch.no_grad()
def dampen(model, i_forget, i_train, alpha: float, lam: float) -> int:
    """Apply the SSD rule in place; returns the number of dampened weights: those selected
    whose factor is below 1 (with ``alpha`` below ``lam`` a selected weight can get
    ``beta = 1`` and stay as it was, and was counted)."""
    count = 0
    for n, p in model.named_parameters():
        selected = i_forget[n] > alpha * i_train[n]
        beta = (lam * i_train[n] / i_forget[n].clamp_min(1e-30)).clamp(max=1.0)
        p[selected] = p[selected] * beta[selected]
        count += int((selected & (beta < 1)).sum())
    return count


def unlearn(model, data, config):
    cfg = loops.merged_config(DEFAULTS, config)
    student = loops.working_copy(model, data)
    before = loops.forget_loss_value(student, data)
    tasks = data.forget_tasks
    i_train = train_importance(student, data, cfg["fisher_samples"])
    forget = data.forget_batch().to(data.device)
    singles = [loops.take(forget, torch.tensor([i])) for i in range(len(forget.index))]
    i_forget = fisher_diagonal(student, singles, lambda b: [t for t in tasks if bool(b.has[t][0])], data.progress)
    dampened = dampen(student, i_forget, i_train, float(cfg["alpha"]), float(cfg["lambda"]))
    log = loops.method_log(
        "ssd",
        cfg,
        0,
        before,
        student,
        data,
        dampened_weights=dampened,
        total_weights=sum(p.numel() for p in student.parameters()),
    )
    return loops.in_callers_mode(student, model), log
