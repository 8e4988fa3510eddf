"""A small hyper-parameter sweep of the baseline unlearning methods.

One synthetic ``indoor`` world (segmentation, depth, normals), one original
model trained with :func:`unlearning.train.train_model` (``RECIPE``: 100
epochs, so that it memorises its 64 training scenes and membership inference
has something to find), two requests on it: *full* (6 instances, every
task) and *partial* (the same 6 instances, depth only). The retrained gold
standard of each request gives the target MIA AUC. Every grid point of
every baseline runs on both requests and is evaluated with
:func:`unlearning.evaluate.evaluate_unlearning`.

Three request draws (seeds: which instances are forgotten) and every number
averaged over them, because with 6 forgotten instances one AUC moves by
about 0.1 from draw to draw. Selection, per baseline, one setting for both
modes (DEFAULTS is one dict): a setting *forgets* when
``|mean mia_auc - mean mia_auc_retrain| <= TOLERANCE`` in both modes;
among those, the lowest mean UIS over the two modes wins. The tolerance
(0.15) covers the seed-averaged AUC noise and the two modes' different
targets (the gold standard's AUC is about 0.36 in full mode and 0.63 in
partial mode: a retrained model still saw the image and its other tasks). When no
setting forgets, the one with the smallest worst-mode MIA gap is reported
(flagged ``forgets: false``).

    python benchmarks/sweep_baselines.py            # writes benchmarks/sweep_baselines.json
    python benchmarks/sweep_baselines.py --quick --seeds 0   # smoke test: 2 points per method
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from unlearning.data import load_splits
from unlearning.evaluate import EvalContext, evaluate_unlearning
from unlearning.methods import UnlearnData, get_method, method_defaults
from unlearning.train import TrainConfig, train_model

TOLERANCE = 0.15  # seed-averaged AUC noise (~0.06) plus one setting serving two targets

SPEC = {"name": "indoor", "n_train": 64, "n_test": 32, "height": 32, "width": 32, "seed": 0}
RECIPE = TrainConfig(epochs=100, batch_size=16, lr=2e-3, seed=0, width=16, depth=3, head_width=16)
FORGET_INSTANCES = 6

# name -> a grid {key: values} (the product) or a list of grids (their union).
# At most 200 steps (interference_aware's budget). Grids are widened until the chosen value of every
# parameter has a tried value on both sides (where a side can be tried); second
# grids refine around the first grid's best points. Points known to be hopeless
# on this world are left out to keep the sweep small (finetune and l1_sparse at
# lr 1e-3 keep MIA ~0.97: they do not forget in tens of steps).
GRID = {
    "finetune": {"lr": [3e-3, 5e-3, 1e-2], "steps": [40, 80, 120]},
    "gradient_ascent": {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "steps": [2, 3, 5, 10, 20]},
    "neggrad_plus": [
        {"alpha": [0.5, 0.7, 0.8, 0.9, 0.99], "lr": [3e-4, 1e-3], "steps": [20]},
        {"alpha": [0.75, 0.8, 0.85], "lr": [5e-4], "steps": [20]},
        {"alpha": [0.8], "lr": [5e-4], "steps": [10, 40]},
    ],
    "random_target": {"lr": [3e-4, 1e-3, 2e-3], "steps": [10, 20, 40]},
    "scrub": [
        {"lr": [1e-3, 2e-3, 3e-3, 5e-3], "max_rounds": [3, 5, 8], "rounds": [15]},
        {"lr": [2e-3, 3e-3, 5e-3], "max_rounds": [5], "rounds": [10]},
    ],
    "salun": [
        {"gamma": [0.1, 0.2, 0.3, 0.5], "lr": [3e-4, 1e-3, 3e-3], "steps": [20]},
        {"gamma": [0.1, 0.2, 0.3], "lr": [1e-3], "steps": [10, 40]},
    ],
    "ssd": [
        {"alpha": [1.0, 2.0, 3.0, 4.0, 5.0, 10.0], "lambda": [0.5, 1.0]},
        {"alpha": [1.0], "lambda": [0.6, 0.7, 0.8]},
    ],
    "l1_sparse": {"l1": [1e-4, 1e-3, 1e-2], "lr": [3e-3, 5e-3, 1e-2], "steps": [40]},
    "pcgrad": [
        {"lr": [5e-5, 1e-4, 3e-4], "steps": [10, 20, 30], "forget_weight": [0.5, 1.0, 2.0]},
        {"lr": [2e-4], "steps": [10, 15], "forget_weight": [0.5, 1.0]},
    ],
}


def grid_points(grid) -> list[dict]:
    if isinstance(grid, list):
        return [p for g in grid for p in grid_points(g)]
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def build_world(seed: int):
    train, test = load_splits(SPEC)
    original = train_model(train, RECIPE, progress=False).eval()
    ids = train.instance_ids
    chosen = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:FORGET_INSTANCES].tolist()
    forget_ids = [ids[i] for i in chosen]
    requests = {
        "full": [(iid, t) for iid in forget_ids for t in train.tasks],
        "partial": [(iid, "depth") for iid in forget_ids],
    }
    return train, test, original, requests


def evaluate(original, unlearned, train, cells, test, retrained, context):
    ev = evaluate_unlearning(original, unlearned, train, cells, test, retrained=retrained, context=context)
    keep = ("uis", "uis_task", "uis_inst", "mia_auc", "mia_auc_original", "mia_auc_retrain", "forget_gap")
    return {k: ev[k] for k in keep}


def mean(values):
    """The mean over seeds; None when any seed's value is missing (a diverged run's MIA AUC)
    or NaN: averaged over the other seeds, a point that diverges on one would look as good
    as its good runs (as unlearning.bench's means)."""
    values = list(values)
    if not values or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    return sum(values) / len(values)


def summarise(per_seed: list[dict]) -> dict:
    """Mean over seeds of each number of one (setting, mode)."""
    return {k: mean([r[k] for r in per_seed]) for k in per_seed[0]}


def choose(rows: list[dict]) -> dict:
    """The setting that forgets in both modes with the least mean UIS (see module docstring).
    ``rows`` carry seed-averaged numbers per mode."""
    def gap(row):
        gaps = [abs(row[m]["mia_auc"] - row[m]["mia_auc_retrain"]) for m in ("full", "partial")
                if row[m]["mia_auc"] is not None and row[m]["mia_auc_retrain"] is not None]
        return max(gaps) if len(gaps) == 2 else float("inf")

    def mean_uis(row):  # a missing UIS (a diverged point) ranks last
        uis = [row[m]["uis"] for m in ("full", "partial")]
        return float("inf") if any(u is None or math.isnan(u) for u in uis) else sum(uis) / 2

    forgetting = [r for r in rows if gap(r) <= TOLERANCE]
    best = min(forgetting, key=mean_uis) if forgetting else min(rows, key=gap)
    return {"config": best["config"], "forgets": bool(forgetting), "mia_gap": gap(best), "mean_uis": mean_uis(best)}


def sweep_seed(seed: int, methods: list[str], quick: bool, threads: int, grids: dict | None = None) -> dict:
    """Every grid point of ``methods`` on the two requests of one seed (which instances are forgotten);
    ``grids`` replaces ``GRID``'s grid of the methods it names."""
    grids = {**GRID, **(grids or {})}
    torch.set_num_threads(threads)
    t0 = time.time()
    train, test, original, requests = build_world(seed)
    contexts, retrained, reference = {}, {}, {}
    for mode, cells in requests.items():
        contexts[mode] = EvalContext(original, train, test)
        data = UnlearnData(train=train, forget_cells=cells, retain=train.without(cells), heldout=test, seed=seed)
        t = time.time()
        retrained[mode], _ = get_method("retrain")(original, data, {"train": asdict(RECIPE)})
        reference[mode] = evaluate(original, retrained[mode], train, cells, test, retrained[mode], contexts[mode])
        reference[mode]["seconds"] = round(time.time() - t, 2)
    print(f"seed {seed}: world and gold standards in {time.time() - t0:.0f}s; retrain {reference}", flush=True)

    results = {}
    for method in methods:
        rows = []
        for point in grid_points(grids[method])[: 2 if quick else None]:
            row = {"config": point}
            for mode, cells in requests.items():
                data = UnlearnData(train=train, forget_cells=cells, retain=train.without(cells), heldout=test, seed=seed)
                t = time.time()
                unlearned, _ = get_method(method)(original, data, point)
                seconds = time.time() - t
                row[mode] = evaluate(original, unlearned, train, cells, test, retrained[mode], contexts[mode])
                row[mode]["seconds"] = round(seconds, 2)
            rows.append(row)
        results[method] = rows
        print(f"seed {seed}: {method} done at {time.time() - t0:.0f}s", flush=True)
    return {"seed": seed, "requests": {m: [list(c) for c in cells] for m, cells in requests.items()},
            "retrain": reference, "methods": results}


def markdown_table(out: dict) -> str:
    """The chosen setting of every baseline with its seed-averaged numbers, and the gold standard."""
    def cell(x, digits):
        return "–" if x is None else f"{x:.{digits}f}"

    lines = [
        "| method | chosen setting | forgets | UIS full | MIA full | UIS partial | MIA partial |",
        "|---|---|---|---|---|---|---|",
    ]
    ref = out["retrain"]
    lines.append(f"| retrain (target) | recipe | – | {cell(ref['full']['uis'], 2)} | {cell(ref['full']['mia_auc'], 3)} "
                 f"| {cell(ref['partial']['uis'], 2)} | {cell(ref['partial']['mia_auc'], 3)} |")
    orig = {m: ref[m]["mia_auc_original"] for m in ("full", "partial")}
    lines.append(f"| original (no unlearning) | – | – | 0.00 | {cell(orig['full'], 3)} | 0.00 | {cell(orig['partial'], 3)} |")
    for method, res in out["methods"].items():
        chosen = res["chosen"]
        row = next(r for r in res["rows"] if r["config"] == chosen["config"])
        setting = ", ".join(f"{k}={v:g}" for k, v in chosen["config"].items())
        lines.append(
            f"| {method} | {setting} | {'yes' if chosen['forgets'] else 'no'} | {cell(row['full']['uis'], 2)} "
            f"| {cell(row['full']['mia_auc'], 3)} | {cell(row['partial']['uis'], 2)} | {cell(row['partial']['mia_auc'], 3)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    parser.add_argument("--methods", nargs="*", default=list(GRID))
    parser.add_argument("--quick", action="store_true", help="only the first 2 grid points per method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (tiny convs: 1 is fastest)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="request draws (which instances)")
    parser.add_argument("--workers", type=int, default=2, help="seeds run in parallel processes")
    parser.add_argument("--table", action="store_true", help="only print the markdown table of --out")
    parser.add_argument("--grid", type=json.loads, default=None, metavar="JSON",
                        help="{method: grid} replacing GRID's grid of those methods (a grid: {key: [values]}, "
                             "their product, or a list of such, their union); e.g. a check of settings the "
                             "committed sweep did not try, written to another --out")
    parser.add_argument("--merge", action="store_true",
                        help="replace only --methods in an existing --out (runs are seeded, so this equals a full run)")
    args = parser.parse_args(argv)
    for method, grid in (args.grid or {}).items():
        try:
            if method not in GRID or not grid_points(grid):
                raise TypeError
        except (TypeError, AttributeError, ValueError):
            parser.error(f"--grid: {method!r} must be a baseline of GRID with a grid {{key: [values]}} "
                         "or a list of such")
    if args.table:
        out = json.loads(Path(args.out).read_text())
        print(markdown_table(out))
        return out

    if args.merge:
        # the chosen defaults are means over the file's seeds: another set of seeds dropped the
        # other methods' runs of the seeds not run again (chosen from fewer), or failed on a new one
        try:
            held = sorted(r["seed"] for r in json.loads(Path(args.out).read_text())["per_seed"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--merge: cannot read the sweep {args.out}: {exc}")
        if held != sorted(args.seeds):
            parser.error(f"--merge: {args.out} holds seeds {held}, not {sorted(args.seeds)}; give --seeds "
                         + " ".join(map(str, held)))
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=max(1, min(args.workers, len(args.seeds)))) as pool:
        futures = [pool.submit(sweep_seed, s, args.methods, args.quick, args.threads, args.grid) for s in args.seeds]
        per_seed = [f.result() for f in futures]

    if args.merge:  # keep the other methods' runs from the existing file
        previous = {r["seed"]: r for r in json.loads(Path(args.out).read_text())["per_seed"]}
        for run in per_seed:
            merged = dict(previous[run["seed"]]["methods"])
            merged.update(run["methods"])
            run["methods"] = merged
        args.methods = [m for m in GRID if m in per_seed[0]["methods"]]
    reference = {m: summarise([r["retrain"][m] for r in per_seed]) for m in ("full", "partial")}
    results = {}
    for method in args.methods:
        rows = []
        for i, first in enumerate(per_seed[0]["methods"][method]):
            row = {"config": first["config"]}
            for mode in ("full", "partial"):
                row[mode] = summarise([r["methods"][method][i][mode] for r in per_seed])
            rows.append(row)
        results[method] = {"defaults_before": method_defaults(method), "rows": rows, "chosen": choose(rows)}
        print(f"== {method}: chosen {results[method]['chosen']}", flush=True)

    # the command as given (every option: --methods, --workers, --threads, --out ...)
    command = shlex.join(["python", "benchmarks/sweep_baselines.py", *(sys.argv[1:] if argv is None else argv)])
    if args.merge:
        previous_command = json.loads(Path(args.out).read_text())["command"]
        command = f"{previous_command} && {command}"
    out = {
        "command": command,
        "dataset": SPEC,
        "recipe": asdict(RECIPE),
        "forget_instances": FORGET_INSTANCES,
        "tolerance": TOLERANCE,
        "seeds": args.seeds,
        "note": "rows and retrain are means over seeds; per_seed keeps every run",
        "retrain": reference,
        "methods": results,
        "per_seed": per_seed,
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(markdown_table(out))
    print(f"wrote {args.out} in {out['seconds']}s")
    return out


if __name__ == "__main__":
    main()
