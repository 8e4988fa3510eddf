"""How well does a calibration of some folds predict the other folds' out-of-fold scores?

interference_aware's ``shadow_trained_folds = n`` trains the shadow models of only
the first ``n`` folds; every other cell's score is predicted, by default from the
cell's loss rank under the calibrated model (``shadow_extrapolate: "loss_rank"``, a
line per task and mode fitted on the scored cells: ``extrapolated_scores``), or as
its task's mean score (``"task_mean"``). This script takes a calibration with every
fold trained (the suite's recipe, the method's fold split), pretends in turn that
only fold ``f`` was trained, predicts the cells of the other folds both ways and
compares the predictions with the scores those cells measured. Per benchmark, mode
and task it reports

- ``spearman``: the rank correlation of the loss rank and the measured score over
  every cell (how much the rank says at all),
- ``mae_loss_rank`` / ``mae_task_mean``: the mean |prediction − measured score| over
  the cells outside the trained fold, averaged over the choice of that fold,
- ``gain``: ``1 − mae_loss_rank / mae_task_mean`` (positive: the line is closer).

Per cell, not per request: a request's score is the mean of its cells', whose errors
partly cancel (``calibration_predictor.py --trained-folds`` measures requests
against their gold standards).

    python benchmarks/shadow_extrapolation.py --suite smoke --folds 4 --out benchmarks/shadow_subset/amd_epyc_avx2/extrapolation_smoke.json

Shadows come from (and go to) the bench cache, as the bench's and
``calibration_predictor.py``'s do.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from unlearning.bench import SUITES, _device_name, cached_original, shadow_trainer
from unlearning.data import load_splits
from unlearning.methods import UnlearnData
from unlearning.methods.interference_aware import (DEFAULTS, extrapolated_scores, loss_ranks, shadow_folds,
                                                   shadow_scores, training_loss_ranks)
from unlearning.train import TrainConfig


def spearman(x: list[float], y: list[float]) -> float:
    """Pearson correlation of the mid-ranks (ties share a rank)."""
    rx, ry = loss_ranks(torch.tensor(x)), loss_ranks(torch.tensor(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def compare(table: dict[str, dict[str, float]], ranks: dict[str, dict[str, float]], folds: list[list[str]]) -> dict:
    """Per task: the loss-rank line and the task mean, each fitted on one fold's cells of
    ``table`` (one mode's measured scores), against the other folds' measured scores."""
    out = {}
    for t in ranks:
        cells = [i for i in ranks[t] if t in table.get(i, {})]
        if len(cells) < 2:
            continue
        line_err, mean_err = [], []
        for fold in folds:
            inside = set(fold)
            scored = {i: {t: table[i][t]} for i in cells if i in inside}
            others = [i for i in cells if i not in inside]
            if not scored or not others:
                continue
            predicted, _ = extrapolated_scores(scored, {t: {i: ranks[t][i] for i in cells}})
            level = sum(v[t] for v in scored.values()) / len(scored)
            line_err.append(sum(abs(predicted[i][t] - table[i][t]) for i in others) / len(others))
            mean_err.append(sum(abs(level - table[i][t]) for i in others) / len(others))
        if not line_err:
            continue
        line, const = sum(line_err) / len(line_err), sum(mean_err) / len(mean_err)
        out[t] = {"cells": len(cells), "spearman": round(spearman([ranks[t][i] for i in cells],
                                                                   [table[i][t] for i in cells]), 3),
                  "mae_loss_rank": round(line, 4), "mae_task_mean": round(const, 4),
                  "gain": round(1 - line / const, 3) if const > 0 else None}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="smoke")
    p.add_argument("--cache-dir", default=".cache/bench", help="the bench cache (shadows are trained if absent)")
    p.add_argument("--benchmarks", nargs="+", default=None)
    p.add_argument("--folds", type=int, default=DEFAULTS["shadow_folds"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    suite = SUITES[args.suite]
    recipe = TrainConfig(**suite["train"])
    cache = Path(args.cache_dir) / args.suite
    results = {}
    for bench in args.benchmarks or list(suite["benchmarks"]):
        spec = suite["benchmarks"][bench]
        train, test = load_splits(spec)
        original, _ = cached_original(cache, train, spec, recipe, device)
        data = UnlearnData(train, [train.cells()[0]], train, heldout=test)
        table = shadow_scores(original, data, asdict(recipe), args.folds, DEFAULTS["shadow_seed"],
                              trainer=shadow_trainer(cache, train, spec, device))
        ranks = training_loss_ranks(original.eval(), train, device)
        folds = shadow_folds(train.instance_ids, table["folds"], DEFAULTS["shadow_seed"])
        for mode in ("full", "partial"):
            results[f"{bench}/{mode}"] = compare(table[mode], ranks, folds)
            print(bench, mode, json.dumps(results[f"{bench}/{mode}"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "device": _device_name(device),
        "suite": args.suite, "folds": args.folds, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
