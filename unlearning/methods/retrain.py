"""Retrain: the gold standard. A fresh model with the deployed model's
architecture (same :class:`~unlearning.model.ModelConfig`), trained from scratch
with the original recipe on ``data.retain`` only, so the forget cells never
influenced it.

``config["train"]`` carries the original :class:`~unlearning.train.TrainConfig`
fields (the manifest's recipe); top-level keys of the same names override
them (e.g. ``{"epochs": 5}`` for a quick run). The initialisation seed is the
recipe's ``seed`` when given, else ``data.seed``. The architecture always comes
from the model, not from the recipe. Nothing of the old model is kept, so no
parameter is promised identical.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, fields

import torch

from ..model import MultiTaskNet

PROTECTS_HEADS = False

DEFAULTS: dict = {}  # everything comes from the training recipe (unlearning.train.TrainConfig)


def unlearn(model, data, config):
    from ..train import TrainConfig, train_model  # the training module is heavier; import on use

    config = dict(config or {})
    known = {f.name for f in fields(TrainConfig)}
    recipe = {k: v for k, v in dict(config.get("train") or {}).items() if k in known}
    recipe.update({k: v for k, v in config.items() if k in known})
    recipe.setdefault("seed", int(data.seed))
    arch = model.config
    recipe.update(width=arch.width, depth=arch.depth, head_width=arch.head_width)
    cfg = TrainConfig(**recipe)

    torch.manual_seed(cfg.seed)
    fresh = MultiTaskNet(copy.deepcopy(arch))
    fresh = train_model(data.retain, cfg, model=fresh, device=data.device, progress=False, on_progress=data.progress)
    log = {
        "method": "retrain",
        "config": {"train": asdict(cfg)},
        "retain_instances": len(data.retain),
        "retain_cells": int(data.retain.available.sum()),
    }
    return fresh.train(model.training), log  # the caller's mode (train_model returns it in eval mode)
