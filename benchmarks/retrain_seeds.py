"""How much of the gold standard's membership-inference AUC comes from its training seed:
retrain every setting of a suite (forget sets of 8) with several initialisation seeds
and report each retrained model's MIA AUC on the forgotten cells against the gold
standard's (the suite's recipe, whose seed is also the original model's).

The bench's ``retrain_independent`` is seed + 1. A third seed tells whether the gap
between the two is a property of sharing the original's seed (every other seed lands
on the same side) or just two draws of the same noise.

    python benchmarks/retrain_seeds.py --suite smoke --seeds 0 1 4 5 6 7 8 9 --offsets 1 2 \
        --workers 2 --out benchmarks/mia_seeds/retrain_seeds.json

Models come from (and go to) the bench cache, so the gold standards and seed + 1
retrains of an earlier ``python -m unlearning.bench`` run are reused.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from unlearning.bench import SUITES, _device_name, _pretrain, cached_retrain, settings, suite_runtime
from unlearning.data import load_splits
from unlearning.evaluate import membership_auc

from seed_spread import mean_se  # noqa: E402  this folder's script (run as python benchmarks/retrain_seeds.py)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="smoke", choices=sorted(SUITES))
    p.add_argument("--seeds", nargs="+", type=int, required=True, help="forget-set seeds")
    p.add_argument("--offsets", nargs="+", type=int, default=[1, 2], help="training seeds: the recipe's seed + these")
    p.add_argument("--cache-dir", default=".cache/bench")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    suite = SUITES[args.suite]
    device, recipe = suite_runtime(suite, "cpu")
    threads = suite.get("threads")  # the workers' thread count too
    cache_dir = Path(args.cache_dir) / args.suite
    recipes = {0: recipe, **{o: replace(recipe, seed=recipe.seed + o) for o in args.offsets}}
    plan = []
    for bench, spec in suite["benchmarks"].items():
        train, test = load_splits(spec)
        plan += [(bench, spec, train, test, st) for st in settings(train, suite, args.seeds) if st["n_forget"] == 8]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        futures = [pool.submit(_pretrain, str(cache_dir), spec, asdict(r), st["cells"], threads, "cpu")
                   for _, spec, _, _, st in plan for r in recipes.values()]
        for f in futures:
            f.result()
    rows = []
    for bench, spec, train, test, st in plan:
        row = {"benchmark": bench, "setting": st["setting"], "forget_tasks": st["forget_tasks"], "seed": st["seed"]}
        for offset, r in recipes.items():
            model, _ = cached_retrain(cache_dir, train, spec, st["cells"], r, device)
            row[f"mia_seed+{offset}"] = round(float(membership_auc(model, train, st["cells"], test, device)[0]), 6)
        rows.append(row)
    summary = {}
    for row in rows:
        key = f"{row['benchmark']}/{row['setting']}"
        for offset in args.offsets:
            summary.setdefault(key, {}).setdefault(f"seed+{offset} - gold", []).append(
                row[f"mia_seed+{offset}"] - row["mia_seed+0"])
    for differences in summary.values():
        for name, d in differences.items():
            mean, se = mean_se(d)
            differences[name] = {"runs": len(d), "mean": round(mean, 4), "se": None if se is None else round(se, 4)}
    doc = {"suite": args.suite, "seeds": args.seeds, "offsets": args.offsets, "device": _device_name(device),
           "command": "python benchmarks/retrain_seeds.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
           "summary": summary, "rows": rows}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    for k, v in summary.items():
        print(k, "  ".join(f"{name}: {s['mean']:+.3f} (SE {s['se']})" for name, s in v.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
