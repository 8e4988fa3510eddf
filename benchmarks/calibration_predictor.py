"""How well does interference_aware's shadow calibration predict what a retrained
model shows on a particular request?

For each benchmark of a suite it computes the out-of-fold scores of every
training cell (``interference_aware.shadow_scores``, the method's defaults:
4 folds, seed 0) and, for the forget sets that ``--seeds`` draw (full erasure
of 8 instances, partial erasure of each task), compares the gold standard's
MIA AUC on that set with

- ``per_request``: the mean out-of-fold score of the set's cells (what the
  method now aims at; with ``--trained-folds n`` only the first n folds' shadows
  are trained, as the method's ``shadow_trained_folds`` does, and a cell outside
  them counts with the score its loss rank predicts, or with ``--extrapolate
  task_mean`` its task's mean score in that mode),
- ``per_task``: one constant per task and mode, the mean score over every
  training cell (what one expected AUC per task can do at best),
- ``independent``: a second gold standard (the recipe with the next seed) --
  how far two retrained models disagree, the floor of any prediction.

    python benchmarks/calibration_predictor.py --seeds 0 1 2 3 --out benchmarks/tune_round3/predictor.json
    python benchmarks/calibration_predictor.py --seeds 0 1 2 3 --folds 8 --trained-folds 1 --out ...

Trained models, the shadows included, come from (and go to) the bench cache
``.cache/bench/<suite>``, so the bench and this script train each shadow once.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from unlearning.bench import (SUITES, _device_name, cached_original, cached_retrain, independent_recipe, settings,
                              shadow_trainer)
from unlearning.data import load_splits
from unlearning.evaluate import membership_auc
from unlearning.methods import UnlearnData
from unlearning.methods.interference_aware import DEFAULTS, shadow_scores
from unlearning.train import TrainConfig


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _auc(model, train, test, cells) -> float:
    return membership_auc(model, train, cells, test, torch.device("cpu"))[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--suite", default="smoke")
    p.add_argument("--cache-dir", default=".cache/bench", help="the bench cache (models are trained if absent)")
    p.add_argument("--benchmarks", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=DEFAULTS["shadow_folds"])
    p.add_argument("--modes", nargs="+", default=["full", "partial"], choices=["full", "partial"])
    p.add_argument("--repeats", type=int, default=1,
                   help="average the scores of this many fold splits (shadow seeds 0..R-1; the method uses one)")
    p.add_argument("--trained-folds", type=int, default=None,
                   help="train the shadows of only the first n folds (the method's shadow_trained_folds)")
    p.add_argument("--extrapolate", default=DEFAULTS["shadow_extrapolate"], choices=["loss_rank", "task_mean"],
                   help="with --trained-folds: how the other folds' cells get a score (the method's shadow_extrapolate)")
    p.add_argument("--no-independent", action="store_true", help="skip the second gold standard (a training per set)")
    args = p.parse_args()
    torch.set_num_threads(1)
    suite = SUITES[args.suite]
    recipe = TrainConfig(**suite["train"])
    cache = Path(args.cache_dir) / args.suite
    rows, summary = [], {}
    for bench in args.benchmarks or list(suite["benchmarks"]):
        spec = suite["benchmarks"][bench]
        train, test = load_splits(spec)
        original, _ = cached_original(cache, train, spec, recipe, torch.device("cpu"))
        data = UnlearnData(train, [train.cells()[0]], train, heldout=test)
        t0 = time.perf_counter()
        runs = [shadow_scores(original, data, asdict(recipe), args.folds, DEFAULTS["shadow_seed"] + r, tuple(args.modes),
                              trained_folds=args.trained_folds, extrapolate=args.extrapolate,
                              trainer=shadow_trainer(cache, train, spec, torch.device("cpu")))
                for r in range(args.repeats)]
        scores = {mode: {i: {t: mean(run[mode][i][t] for run in runs if i in run[mode]) for t in by}
                         for run0 in runs for i, by in run0[mode].items()} for mode in ("full", "partial")}
        scores.update(shadows=sum(run["shadows"] for run in runs), seconds=round(sum(run["seconds"] for run in runs), 3))
        print(f"{bench}: {scores['shadows']} shadows in {time.perf_counter() - t0:.0f} s", flush=True)
        # the constant per task: over measured cells only (with --trained-folds the table also holds predictions)
        measured = set(runs[0]["measured_instances"] or train.instance_ids)
        const = {mode: {t: mean(by[t] for i, by in scores[mode].items() if t in by and i in measured)
                        for t in train.tasks} for mode in args.modes}
        for st in settings(train, suite, args.seeds):
            if (st["setting"] == "full" and st["n_forget"] != 8) or st["setting"] not in args.modes:
                continue
            cells, mode = st["cells"], st["setting"]
            gold, _ = cached_retrain(cache, train, spec, cells, recipe, torch.device("cpu"))
            other = None if args.no_independent else cached_retrain(
                cache, train, spec, cells, independent_recipe(recipe), torch.device("cpu"))[0]
            row = {"benchmark": bench, "setting": mode, "forget_tasks": st["forget_tasks"], "seed": st["seed"],
                   "retrain": _auc(gold, train, test, cells),
                   "per_request": mean(scores[mode].get(i, {}).get(t, const[mode][t]) for i, t in cells),
                   "per_task": sum(const[mode][t] for _, t in cells) / len(cells),
                   "independent": None if other is None else _auc(other, train, test, cells)}
            rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            print(rows[-1], flush=True)
        for mode in args.modes:
            mine = [r for r in rows if r["benchmark"] == bench and r["setting"] == mode]
            summary[f"{bench}/{mode}"] = {
                f"mean_abs_err_{k}": round(sum(abs(r[k] - r["retrain"]) for r in mine) / len(mine), 4)
                for k in ("per_request", "per_task", "independent") if mine and mine[0][k] is not None} | {"sets": len(mine)}
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "device": _device_name(torch.device("cpu")),
        "suite": args.suite, "folds": args.folds, "trained_folds": args.trained_folds,
        "extrapolate": args.extrapolate if args.trained_folds else None, "repeats": args.repeats, "modes": args.modes, "shadows": scores["shadows"],
        "shadow_seconds": scores["seconds"], "summary": summary, "sets": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
