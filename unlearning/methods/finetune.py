"""Fine-tuning (Golatkar et al. 2020's "fine-tune" baseline): keep training on
the retained cells only and rely on catastrophic forgetting of the rest.

Update rule: ``θ ← θ - η ∇L_r`` on seeded random retain batches (``data.retain``,
whose ``has`` masks out the erased cells, so in partial mode the forgotten
instances' other tasks are still trained). No forget signal at all; every
head is trained, so protected heads are not promised to stay identical.
"""
from __future__ import annotations

from . import loops

PROTECTS_HEADS = False

# Chosen by benchmarks/sweep_baselines.py (docs/baselines.md).
# benchmarks/sweep_extension (2026-12-07): the grid extended past the first sweep's edges
DEFAULTS = {
    "steps": 200,
    "lr": 5e-3,
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
    before = loops.forget_loss_value(student, data)

    def fill_grads(step):
        lr_ = loops.retain_loss(student, retain.next())
        lr_.backward()
        return {"retain_loss": lr_}

    history = loops.run_update_loop(
        params, cfg["steps"], fill_grads, loops.make_optimizer(params, cfg), data, cfg["grad_clip"]
    )
    log = loops.method_log("finetune", cfg, cfg["steps"], before, student, data, history=history)
    return loops.in_callers_mode(student, model), log
