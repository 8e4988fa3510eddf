"""How much a suite's original model memorises its training scenes, from its cached checkpoint.

The benchmark can only tell methods apart when the original model is measurably
vulnerable: its loss on a training scene is lower than on a held-out one. This
loads the original that ``unlearning.bench`` cached for a suite and benchmark
(``--cache-dir`` as given to the bench), renders the suite's data and writes, as
JSON: per-task metrics on the training and held-out splits, the loss-threshold
attack's AUC over every training scene against the held-out ones (per task and
pooled), and the AUC on each forget set the bench draws (``mia_auc_original`` of
its rows), without training anything. It runs on CPU too (slowly at ``full``'s
image size).

    python benchmarks/original_memorisation.py --suite full --benchmark indoor \
        --cache-dir benchmarks/full/cache --out benchmarks/full/original_memorisation_indoor.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from unlearning import bench
from unlearning.data import load_splits
from unlearning.evaluate import losses_of_cells, metrics_and_losses
from unlearning.metrics import mia_auc
from unlearning.model import load_model
from unlearning.train import resolve_device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="full", choices=sorted(bench.SUITES))
    p.add_argument("--benchmark", default="indoor")
    p.add_argument("--cache-dir", default=".cache/bench", help="as given to unlearning.bench")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    suite = bench.SUITES[args.suite]
    spec = suite["benchmarks"][args.benchmark]
    _, recipe = bench.suite_runtime(suite, "cpu")  # the recipe only; the device is --device
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = bench.cache_entry(Path(args.cache_dir) / args.suite, recipe, bench.original_key(spec))
    if not (directory / "bench.json").is_file():
        p.error(f"no cached original for {args.suite}/{args.benchmark} under {directory}; run unlearning.bench first")
    model = load_model(directory, map_location=device).eval()
    meta = json.loads((directory / "bench.json").read_text())

    t0 = time.perf_counter()
    train, test = load_splits(spec, render_workers="auto")
    render_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    # one pass over each split gives the metrics and every scene's losses; a forget set's
    # AUC (evaluate.membership_auc) is then read off them
    train_metrics, members = metrics_and_losses(model, train, device=device)
    test_metrics, held = metrics_and_losses(model, test, device=device)
    per_task = {t: mia_auc({t: members[t]}, {t: held[t]}) for t in train.tasks}
    forget_sets = []
    for st in bench.settings(train, suite, suite["seeds"]):
        if st["n_forget"] == 8:
            auc = mia_auc(losses_of_cells(members, train.index_of, st["cells"]), held)
            forget_sets.append({"setting": st["setting"], "forget_tasks": st["forget_tasks"], "seed": st["seed"],
                                "mia_auc_original": round(auc, 4)})
    out = {
        "command": "python " + " ".join(sys.argv),
        "model": str(directory),
        "trained_on": "see bench.json beside the model: " + json.dumps(meta),
        "device": bench._device_name(device),
        "torch": torch.__version__,
        "benchmark": spec,
        "recipe": vars(recipe),
        "render_seconds": round(render_seconds, 1),
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "metrics": {"train": train_metrics, "test": test_metrics},
        "mean_loss": {split: {t: float(v[~v.isnan()].mean()) for t, v in losses.items()}
                      for split, losses in (("train", members), ("test", held))},
        "mia_auc_all_train_vs_test": {"pooled": round(mia_auc(members, held), 4),
                                      **{t: round(a, 4) for t, a in per_task.items()}},
        "mia_auc_forget_sets_of_8": forget_sets,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
