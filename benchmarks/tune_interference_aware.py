"""Dev loop for interference_aware: run named config variants on a subset of a
suite (default: smoke, indoor, seed 0 -- the first round's tuning split; the
second round used seeds 2 and 3 of both benchmarks) and print per setting the
UIS, the MIA AUC against the retrained model's and the speed-up.

    python benchmarks/tune_interference_aware.py --variants '{"default": {}}' \
        --out benchmarks/tune_interference_aware.json

``--n-test N`` renders N held-out scenes per benchmark instead of the suite's
(the ``full`` suite has 654), at the suite's image size.

Appends every variant's result, with the device it ran on, to the --out JSON's
``records`` (a tuning record). Files written before that fix also hold, at their
top level, the suite document of the last variant run into them (``suite``,
``config``, ``device``, ``results``); only ``records`` is the record. Trained
models come from the bench cache (``.cache/bench/<suite>``); what the method
caches per model version is kept across the variants of one call.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from unlearning.bench import SUITES, aggregate, run_suite


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", required=True, help='JSON {name: config}')
    p.add_argument("--benchmarks", nargs="+", default=["indoor"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default="benchmarks/tune_interference_aware.json")
    p.add_argument("--suite", default="smoke")
    p.add_argument("--cache-dir", default=".cache/bench", help="the bench cache (models are trained if absent)")
    p.add_argument("--no-shadow", action="store_true", help="as the service runs the method: no shadow calibration")
    p.add_argument("--n-test", type=int, default=None,
                   help="render this many held-out scenes per benchmark instead of the suite's (the training set is the "
                        "same; the cache keys name the spec, so the models are trained again under new keys)")
    args = p.parse_args()
    suite_name = args.suite
    if args.n_test is not None:
        suite_name = f"{args.suite}@n_test={args.n_test}"
        SUITES[suite_name] = copy.deepcopy(SUITES[args.suite])
        for spec in SUITES[suite_name]["benchmarks"].values():
            spec["n_test"] = args.n_test
    variants = json.loads(args.variants)
    out = Path(args.out)
    # the tuning record: {"records": [...]}, each record with the device it was measured on
    record_doc = json.loads(out.read_text()) if out.exists() else {"records": []}
    if isinstance(record_doc, list):
        record_doc = {"records": record_doc}
    record = record_doc["records"]
    caches: dict = {}  # per-model-version state (shadows, subspaces) computed once for every variant
    for name, cfg in variants.items():
        t0 = time.perf_counter()
        run = run_suite(suite_name, ["interference_aware"], args.seeds, Path(args.cache_dir) / args.suite,
                        benchmarks=args.benchmarks, method_configs={"interference_aware": cfg}, progress=False,
                        shadow=not args.no_shadow, engine_caches=caches, independent_retrain=False)
        wall = time.perf_counter() - t0
        rows = {}
        for (b, s, n), by in sorted(aggregate(run["results"]).items()):
            v = by["interference_aware"]
            rows[f"{b}/{s}/{n}"] = {"uis": round(v["uis"], 3), "mia": round(v["mia_auc"], 3),
                                    "mia_retrain": round(v["mia_auc_retrain"], 3), "mia_err": round(v["mia_err"], 3),
                                    "seconds": round(v["seconds"], 2), "speedup": round(v["speedup"], 1)}
        per_run = [{k: r[k] for k in ("benchmark", "setting", "forget_tasks", "n_forget", "seed", "uis", "mia_auc", "mia_auc_retrain")}
                   for r in run["results"]]
        record.append({"variant": name, "config": cfg, "suite": suite_name, "shadow": not args.no_shadow,
                       "benchmarks": args.benchmarks, "seeds": args.seeds, "device": run["device"],
                       "wall_seconds": round(wall, 1), "summary": rows, "runs": per_run})
        print(f"== {name} {cfg} ({wall:.0f} s)")
        for k, v in rows.items():
            print(f"   {k:24s} UIS {v['uis']:7.2f}  MIA {v['mia']:.3f} (retrain {v['mia_retrain']:.3f}, err {v['mia_err']:.3f})  "
                  f"{v['seconds']:.1f}s ({v['speedup']:.1f}x)")
        out.write_text(json.dumps(record_doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
