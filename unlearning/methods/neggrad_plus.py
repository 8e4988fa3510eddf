"""NegGrad+ (Kurmanji et al. 2023): descend the retain loss while ascending the
forget loss, in one weighted objective.

Update rule: ``θ ← θ - η ∇(α L_r - (1-α) L_f)`` with ``L_f`` on the forget
cells (forget tasks' heads only) and ``L_r`` on a seeded random retain batch.
The retain term trains every head, so protected heads are not promised to stay
identical in partial mode.
"""
from __future__ import annotations

from . import loops

PROTECTS_HEADS = False

# Chosen by benchmarks/sweep_baselines.py (docs/baselines.md).
DEFAULTS = {
    "steps": 20,
    "lr": 5e-4,
    "alpha": 0.8,  # weight of the retain loss; 1-alpha weighs the (negated) forget loss
    "optimizer": "adam",
    "momentum": 0.9,  # sgd's (loops.make_optimizer); adam has none and ignores it
    "batch_size": 16,
    "forget_batch_size": 32,
    "grad_clip": 5.0,
}


def unlearn(model, data, config):
    cfg = loops.merged_config(DEFAULTS, config)
    alpha = float(cfg["alpha"])
    student = loops.working_copy(model, data)
    tasks = data.forget_tasks
    params = list(student.parameters())
    forget = loops.ForgetBatches(data, cfg["forget_batch_size"], loops.generator(data, 1), data.device)
    retain = loops.RetainBatches(data.retain, cfg["batch_size"], loops.generator(data, 2), data.device)
    before = loops.forget_loss_value(student, data)

    def fill_grads(step):
        lf = loops.forget_loss(student, forget.next(), tasks)
        lr_ = loops.retain_loss(student, retain.next())
        (alpha * lr_ - (1.0 - alpha) * lf).backward()
        return {"forget_loss": lf, "retain_loss": lr_}

    history = loops.run_update_loop(
        params, cfg["steps"], fill_grads, loops.make_optimizer(params, cfg), data, cfg["grad_clip"]
    )
    log = loops.method_log("neggrad_plus", cfg, cfg["steps"], before, student, data, history=history)
    return loops.in_callers_mode(student, model), log
