"""Random targets: the dense-prediction analogue of random-label unlearning
(Golatkar et al. 2020; Graves et al. 2021). Each forget cell ``(i, k)`` is
relabelled with the task-``k`` target of a random retained instance (resampled
every step), so the model is taught that the forgotten image has no
particular answer; a retain term keeps the rest.

Update rule: ``θ ← θ - η ∇(L_f^rand + λ L_r)`` where ``L_f^rand`` is the loss of
the forget cells against donor targets (forget tasks' heads only) and ``L_r``
the loss of a seeded random retain batch. The retain term trains every head,
so protected heads are not promised to stay identical in partial mode.
"""
from __future__ import annotations

from . import loops

PROTECTS_HEADS = False

# Chosen by benchmarks/sweep_baselines.py (docs/baselines.md).
# benchmarks/sweep_extension (2026-12-07): the grid extended past the first sweep's edges
DEFAULTS = {
    "steps": 80,
    "lr": 1e-3,
    "retain_weight": 10.0,  # lambda
    "optimizer": "adam",
    "momentum": 0.9,  # sgd's (loops.make_optimizer); adam has none and ignores it
    "batch_size": 16,
    "forget_batch_size": 32,
    "grad_clip": 5.0,
}


def unlearn(model, data, config):
    cfg = loops.merged_config(DEFAULTS, config)
    student = loops.working_copy(model, data)
    tasks = data.forget_tasks
    params = list(student.parameters())
    donors = loops.DonorTargets(data.retain, tasks, loops.generator(data, 3))
    forget = loops.ForgetBatches(data, cfg["forget_batch_size"], loops.generator(data, 1), data.device)
    retain = loops.RetainBatches(data.retain, cfg["batch_size"], loops.generator(data, 2), data.device)
    before = loops.forget_loss_value(student, data)

    def fill_grads(step):
        relabelled = donors(forget.next())
        lf = loops.forget_loss(student, relabelled, tasks)
        lr_ = loops.retain_loss(student, retain.next())
        (lf + cfg["retain_weight"] * lr_).backward()
        return {"random_target_loss": lf, "retain_loss": lr_}

    history = loops.run_update_loop(
        params, cfg["steps"], fill_grads, loops.make_optimizer(params, cfg), data, cfg["grad_clip"]
    )
    log = loops.method_log(
        "random_target", cfg, cfg["steps"], before, student, data, no_donor_tasks=donors.dropped, history=history
    )
    return loops.in_callers_mode(student, model), log
