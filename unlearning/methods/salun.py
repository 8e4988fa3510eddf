"""SalUn (Fan et al. 2024, "Saliency unlearning"): a weight-saliency mask from the
forget loss's gradient, then random-target relabelling plus retain training that
moves only the salient weights.

1. Saliency: ``g = ∇_θ L_f(θ0)`` on the forget cells (true targets, forget
   tasks' heads only); the mask keeps the top ``gamma`` fraction of all weights
   by ``|g|`` (one global threshold, as in the paper), and never a weight with
   ``g = 0``.
2. Update: ``θ ← θ - η m ⊙ ∇(L_f^rand + λ L_r)`` with ``L_f^rand`` the forget
   cells against donor targets from random retained instances (see
   :mod:`.random_target`) and ``L_r`` a seeded random retain batch.

Protected heads get no forget gradient, hence a zero mask, hence no update:
in a partial-task request they stay bit-identical (``PROTECTS_HEADS``). When no
forget cell carries a labelled pixel (nothing to forget), no weight is salient
and the model comes back unchanged, with 0 steps logged.
"""
from __future__ import annotations

import torch

from . import loops

PROTECTS_HEADS = True

# Chosen by benchmarks/sweep_baselines.py (docs/baselines.md).
# benchmarks/sweep_extension (2026-12-07): the grid extended past the first sweep's edges
DEFAULTS = {
    "steps": 40,
    "lr": 1e-3,
    "gamma": 0.3,  # fraction of weights declared salient
    "retain_weight": 3.0,  # lambda
    "optimizer": "adam",
    "momentum": 0.9,  # sgd's (loops.make_optimizer); adam has none and ignores it
    "batch_size": 16,
    "forget_batch_size": 32,
    "grad_clip": 5.0,
}


def saliency_masks(model, data, gamma: float) -> dict[str, torch.Tensor]:
    """Parameter name -> bool mask of the salient weights (top ``gamma`` of |∇L_f| over all weights)."""
    batch = data.forget_batch().to(data.device)
    model.zero_grad(set_to_none=True)
    loops.forget_loss(model, batch, data.forget_tasks).backward()
    grads = {n: (p.grad.abs() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    flat = torch.cat([g.flatten() for g in grads.values()])
    k = max(1, int(round(gamma * flat.numel())))
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    return {n: (g >= threshold) & (g > 0) for n, g in grads.items()}


def unlearn(model, data, config):
    cfg = loops.merged_config(DEFAULTS, config)
    student = loops.working_copy(model, data)
    tasks = data.forget_tasks
    before = loops.forget_loss_value(student, data)
    masks = saliency_masks(student, data, float(cfg["gamma"]))
    named = [(n, p) for n, p in student.named_parameters() if masks[n].any()]
    params = [p for _, p in named]
    donors = loops.DonorTargets(data.retain, tasks, loops.generator(data, 3))
    forget = loops.ForgetBatches(data, cfg["forget_batch_size"], loops.generator(data, 1), data.device)
    retain = loops.RetainBatches(data.retain, cfg["batch_size"], loops.generator(data, 2), data.device)

    def fill_grads(step):
        relabelled = donors(forget.next())
        lf = loops.forget_loss(student, relabelled, tasks)
        lr_ = loops.retain_loss(student, retain.next())
        (lf + cfg["retain_weight"] * lr_).backward()
        return {"random_target_loss": lf, "retain_loss": lr_}

    def mask_grads():
        for n, p in named:
            if p.grad is not None:
                p.grad.mul_(masks[n])

    # Weights outside ``params`` are not in the optimiser at all; inside it, a masked
    # weight's Adam moments stay exactly 0, so its update is exactly 0.
    if params:
        history = loops.run_update_loop(
            params, cfg["steps"], fill_grads, loops.make_optimizer(params, cfg), data, cfg["grad_clip"], mask_grads
        )
    else:  # no forget cell has a labelled pixel: no gradient, an empty mask, and m = 0 gives back θ0
        history = []
        if data.progress is not None:
            data.progress(1.0)
    for p in student.parameters():  # grads of frozen weights from the last backward
        p.grad = None
    n_salient = sum(int(m.sum()) for m in masks.values())
    log = loops.method_log(
        "salun",
        cfg,
        cfg["steps"] if params else 0,
        before,
        student,
        data,
        salient_weights=n_salient,
        total_weights=sum(m.numel() for m in masks.values()),
        no_donor_tasks=donors.dropped,
        history=history,
    )
    return loops.in_callers_mode(student, model), log
