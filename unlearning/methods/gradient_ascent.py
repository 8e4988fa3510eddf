"""Gradient ascent (NegGrad): ascend the loss of the forget cells, nothing else.

Update rule: ``θ ← θ - η ∇(-L_f)`` with ``L_f`` the sum over forget tasks of
the mean loss over the forget cells (Adam, gradient norm clipped).

Only the forget tasks' heads are run, and only the shared encoder and those
heads are optimised, so in a partial-task request the protected tasks' heads
stay bit-identical (``PROTECTS_HEADS``). Nothing limits how far the forget
loss is pushed except the step budget: that is the baseline's known weakness.
"""
from __future__ import annotations

from . import loops

PROTECTS_HEADS = True

# Chosen by benchmarks/sweep_baselines.py (docs/baselines.md).
DEFAULTS = {
    "steps": 3,  # updates; the whole forget batch each step
    "lr": 1e-3,
    "optimizer": "adam",
    "momentum": 0.9,  # sgd's (loops.make_optimizer); adam has none and ignores it
    "grad_clip": 5.0,
    "forget_batch_size": 32,
}


def unlearn(model, data, config):
    cfg = loops.merged_config(DEFAULTS, config)
    student = loops.working_copy(model, data)
    tasks = data.forget_tasks
    params = loops.forget_task_parameters(student, tasks)
    forget = loops.ForgetBatches(data, cfg["forget_batch_size"], loops.generator(data, 1), data.device)
    before = loops.forget_loss_value(student, data)

    def fill_grads(step):
        lf = loops.forget_loss(student, forget.next(), tasks)
        (-lf).backward()
        return {"forget_loss": lf}

    history = loops.run_update_loop(
        params, cfg["steps"], fill_grads, loops.make_optimizer(params, cfg), data, cfg["grad_clip"]
    )
    log = loops.method_log("gradient_ascent", cfg, cfg["steps"], before, student, data, history=history)
    return loops.in_callers_mode(student, model), log
