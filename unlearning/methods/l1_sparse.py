"""l1-sparse unlearning (Jia et al. 2023, "Model sparsity can simplify machine
unlearning"): fine-tune on the retained cells with an l1 penalty on the
weights whose strength decays linearly to zero over the run (the schedule the
paper found best), so the update is pushed towards a sparse model first and
repaired at the end.

Update rule at step ``t`` of ``T``: ``θ ← θ - η ∇(L_r + γ_t ||θ||_1)``,
``γ_t = γ (1 - t/T)``. No forget signal; every head is trained, so protected
heads are not promised to stay identical in partial mode.
"""
from __future__ import annotations

from . import loops

PROTECTS_HEADS = False

# Chosen by benchmarks/sweep_baselines.py (docs/baselines.md).
DEFAULTS = {
    "steps": 40,
    "lr": 5e-3,
    "l1": 1e-4,  # gamma: initial weight of the l1 penalty (sum of |θ| over all parameters)
    "optimizer": "adam",
    "momentum": 0.9,  # sgd's (loops.make_optimizer); adam has none and ignores it
    "batch_size": 16,
    "grad_clip": 5.0,
}


def unlearn(model, data, config):
    cfg = loops.merged_config(DEFAULTS, config)
    student = loops.working_copy(model, data)
    params = list(student.parameters())
    retain = loops.RetainBatches(data.retain, cfg["batch_size"], loops.generator(data, 2), data.device)
    steps = int(cfg["steps"])
    before = loops.forget_loss_value(student, data)

    def fill_grads(step):
        gamma = cfg["l1"] * (1.0 - step / max(steps, 1))
        lr_ = loops.retain_loss(student, retain.next())
        l1 = sum(p.abs().sum() for p in params)
        (lr_ + gamma * l1).backward()
        return {"retain_loss": lr_, "l1_norm": l1, "gamma": gamma}

    history = loops.run_update_loop(params, steps, fill_grads, loops.make_optimizer(params, cfg), data, cfg["grad_clip"])
    log = loops.method_log("l1_sparse", cfg, steps, before, student, data, history=history)
    return loops.in_callers_mode(student, model), log
