"""Where interference_aware leaves the forgotten cells: for every cell of the forget sets
of 8, its final loss over its final reference level ``τ`` and its realised quantile among
the unlearned model's held-out losses against the quantile it was sent to (shadow
calibration, as the smoke suite runs the method). A realised quantile above the target
means the cell's loss ended higher than a retrained model is expected to put it, which
lowers the MIA AUC.

    python benchmarks/where_cells_land.py --benchmark indoor --seeds 4 5 6 \
        --out benchmarks/mia_seeds/where_cells_land_indoor.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from unlearning.bench import SUITES, _device_name, cached_original, settings, suite_runtime
from unlearning.data import load_splits
from unlearning.losses import per_sample_losses
from unlearning.methods import UnlearnData, get_method


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="smoke", choices=sorted(SUITES))
    p.add_argument("--benchmark", required=True)
    p.add_argument("--seeds", nargs="+", type=int, required=True)
    p.add_argument("--cache-dir", default=".cache/bench", help="the bench cache (the original model is trained if absent)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    suite = SUITES[args.suite]
    device, recipe = suite_runtime(suite, "cpu")
    spec = suite["benchmarks"][args.benchmark]
    train, test = load_splits(spec)
    original, _ = cached_original(Path(args.cache_dir) / args.suite, train, spec, recipe, device)
    cache: dict = {}  # the shadow calibration, computed once for every forget set
    cells_out = []
    for st in settings(train, suite, args.seeds):
        if st["n_forget"] != 8:
            continue
        data = UnlearnData(train, st["cells"], train.without(st["cells"]), heldout=test, device=device,
                           seed=int(st["seed"]), cache=cache)
        model, log = get_method("interference_aware")(original, data, {"shadow_recipe": asdict(recipe)})
        held = per_sample_losses(model, test, device=device)
        for t, final in log["final_forget_losses"].items():
            h = held[t][~torch.isnan(held[t])]
            for x, tau, q in zip(final, log["tau"][t], log["tau_quantiles"][t]):
                cells_out.append({"setting": st["setting"], "seed": st["seed"], "task": t, "loss_over_tau": round(x / tau, 4),
                                  "quantile_target": q, "quantile_reached": round(float((h < x).double().mean()), 4)})
        print(f"{st['setting']} {'/'.join(st['forget_tasks'])} seed {st['seed']}: {log['steps']} steps", flush=True)
    summary = {}
    for setting in ("full", "partial"):
        rows = [c for c in cells_out if c["setting"] == setting]
        if rows:
            summary[setting] = {
                "cells": len(rows),
                "loss_over_tau_mean": round(statistics.mean(c["loss_over_tau"] for c in rows), 4),
                "loss_over_tau_median": round(statistics.median(c["loss_over_tau"] for c in rows), 4),
                "quantile_reached_minus_target_mean": round(
                    statistics.mean(c["quantile_reached"] - c["quantile_target"] for c in rows), 4),
            }
            print(setting, summary[setting])
    doc = {"suite": args.suite, "benchmark": args.benchmark, "seeds": args.seeds, "device": _device_name(device),
           "command": "python benchmarks/where_cells_land.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
           "summary": summary, "cells": cells_out}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
