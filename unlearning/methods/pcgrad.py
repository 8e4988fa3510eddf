"""PCGrad (Yu et al. 2020, gradient surgery) with forgetting and retaining as
the two "tasks": the forget gradient (of the ascent objective ``-L_f``) and the
retain gradient (of ``L_r``) are each projected onto the normal plane of the
other when they conflict, then summed.

With ``g_f = ∇(-L_f)`` (forget cells, forget tasks' heads only) and
``g_r = ∇L_r`` (seeded random retain batch), flattened over all parameters:
if ``g_f·g_r < 0`` then ``g_f' = g_f - (g_f·g_r/|g_r|²) g_r`` and
``g_r' = g_r - (g_r·g_f/|g_f|²) g_f`` (both from the unprojected gradients, as
in the paper), else unchanged; ``θ ← θ - η (w g_f' + g_r')``. The retain
gradient trains every head, so protected heads are not promised to stay
identical in partial mode.
"""
from __future__ import annotations

import torch

from . import loops

PROTECTS_HEADS = False

# Chosen by benchmarks/sweep_baselines.py (docs/baselines.md).
# benchmarks/sweep_extension (2026-12-07): the grid extended past the first sweep's edges
DEFAULTS = {
    "steps": 20,
    "lr": 1e-4,
    "forget_weight": 1.0,  # w
    "optimizer": "adam",
    "momentum": 0.9,  # sgd's (loops.make_optimizer); adam has none and ignores it
    "batch_size": 16,
    "forget_batch_size": 32,
    "grad_clip": 5.0,
}


def project_conflicting(g_f: torch.Tensor, g_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """PCGrad on two flat gradients: each loses its component along the other when they conflict."""
    dot = torch.dot(g_f, g_r)
    if dot >= 0:
        return g_f, g_r, False
    g_f2 = g_f - dot / g_r.dot(g_r).clamp_min(1e-30) * g_r
    g_r2 = g_r - dot / g_f.dot(g_f).clamp_min(1e-30) * g_f
    return g_f2, g_r2, True


def flat_grad(loss: torch.Tensor, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def unlearn(model, data, config):
    cfg = loops.merged_config(DEFAULTS, config)
    student = loops.working_copy(model, data)
    tasks = data.forget_tasks
    params = list(student.parameters())
    forget = loops.ForgetBatches(data, cfg["forget_batch_size"], loops.generator(data, 1), data.device)
    retain = loops.RetainBatches(data.retain, cfg["batch_size"], loops.generator(data, 2), data.device)
    before = loops.forget_loss_value(student, data)
    conflicts = 0

    def fill_grads(step):
        nonlocal conflicts
        lf = loops.forget_loss(student, forget.next(), tasks)
        lr_ = loops.retain_loss(student, retain.next())
        g_f, g_r, conflict = project_conflicting(flat_grad(-lf, params), flat_grad(lr_, params))
        conflicts += int(conflict)
        g = cfg["forget_weight"] * g_f + g_r
        offset = 0
        for p in params:
            p.grad = g[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return {"forget_loss": lf, "retain_loss": lr_, "conflict": int(conflict)}

    history = loops.run_update_loop(
        params, cfg["steps"], fill_grads, loops.make_optimizer(params, cfg), data, cfg["grad_clip"]
    )
    log = loops.method_log(
        "pcgrad",
        cfg,
        cfg["steps"],
        before,
        student,
        data,
        conflicting_steps=conflicts,
        history=history,
    )
    return loops.in_callers_mode(student, model), log
