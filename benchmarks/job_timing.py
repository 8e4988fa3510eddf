"""A job's wall time against a retrain's, at a suite's scale, without training a gold standard.

The ``full`` suite needs a gold standard per setting (~9 GPU-minutes each at 288x384), so
one 15-minute GPU session cannot produce its rows. What it can measure is the speed-up
the issue asks for at that scale, ``retrain / job``, on the cached original:

- **retrain**: the suite's recipe run by ``train_model`` (data kept on the device, as a
  retrain is) for ``--train-epochs`` A and B epochs; seconds per step = the difference of
  the two wall times over the difference of their steps (model build, the copy to the
  device cancel; an untimed warm-up training comes first), times the recipe's steps per
  training. With ``--measure-retrain`` one real gold standard is trained too (the first setting's,
  :func:`unlearning.bench.cached_retrain`; read from the cache when it is there), to check
  the estimate where that is affordable (``smoke`` on a CPU);
- **job**: :func:`unlearning.job.run_unlearning_job`, the worker's call (validation, the
  method, the evaluation: UIS and MIA AUC), on the suite's forget sets, with one
  per-version cache for all of them as the worker keeps it. What that cache holds is
  filled by the first job (``cache_seconds``, reported) and not counted in a job's
  seconds, as in the bench. Before the timed jobs, one untimed warm-up job per data mode
  (the first setting and variant, at 2 steps when the method has a ``steps`` budget) fills
  what else the per-version cache keeps but ``cache_seconds`` does not count (the data's
  copy on the device, the original's evaluation numbers) and pays a process's first-call
  costs (CUDA's libraries), which would otherwise fall on the first timed job alone
  (``warmup`` in the JSON). ``--data`` picks whether the job keeps the training and test
  data on the device (``resident``, the default) or gathers every batch on the host and
  copies it over (``host``); on a CPU the two are the same path. ``--variants`` runs
  every job once per named set of config overrides (e.g. the orthogonalization's two
  implementations).

No gold standard, so no |ΔMIA| against one: each row has the job's ``mia_auc`` and the
original's ``mia_auc_original``.

``--cache-dir`` is the bench's: the suite's models are in ``<cache-dir>/<suite>``, where
``python -m unlearning.bench --cache-dir`` keeps them (until 2026-12-06 this script looked in
``<cache-dir>`` itself, so it missed the committed ``full`` original and trained its own).
``--require-cached`` stops at once when the original is not there (a time-limited device
would spend its time training it).

    python benchmarks/job_timing.py --suite full --benchmark indoor --cache-dir benchmarks/full/cache \\
        --require-cached --seeds 0 1 --settings full:8 partial:depth --data resident host --out job_timing.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from unlearning import bench
from unlearning.data import load_splits
from unlearning.job import run_unlearning_job
from unlearning.methods import method_defaults
from unlearning.train import train_model, training_steps

from gpu_probe import _sync, write_json  # noqa: E402  this folder's script (run as python benchmarks/job_timing.py)


def step_seconds(train, recipe, device, epochs: tuple[int, int], repeat: int = 2) -> dict:
    """Seconds per training step of ``recipe`` on ``train``, from short trainings of
    ``epochs`` A and B (the fastest of ``repeat`` each) after an untimed warm-up of A: the
    first training in a process pays one-time costs (allocator, kernels, thread pools)
    larger than a few steps, which the difference of two timings does not cancel."""
    def timed(e: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        train_model(train, replace(recipe, epochs=e), device=device, progress=False)
        _sync(device)
        return time.perf_counter() - t0

    timed(epochs[0])  # warm-up
    runs = [{"epochs": e, "steps": training_steps(len(train), replace(recipe, epochs=e)),
             "seconds": round(min(timed(e) for _ in range(repeat)), 3)} for e in epochs]
    (a, b) = runs
    per_step = (b["seconds"] - a["seconds"]) / (b["steps"] - a["steps"])
    if per_step <= 0:
        raise SystemExit(f"training steps could not be timed ({runs}): take more epochs (--train-epochs)")
    return {"runs": runs, "seconds_per_step": per_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="full", choices=sorted(bench.SUITES))
    p.add_argument("--benchmark", default="indoor")
    p.add_argument("--cache-dir", default=".cache/bench",
                   help="the bench's cache: the suite's original is in CACHE_DIR/SUITE (trained there if not)")
    p.add_argument("--require-cached", action="store_true",
                   help="stop when the suite's original is not in the cache, instead of training it")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the suite's")
    p.add_argument("--settings", nargs="+", default=None, help="e.g. full:8 partial:depth (default: all of the suite's)")
    p.add_argument("--method", default="interference_aware")
    p.add_argument("--config", default="{}", help="the method's config (JSON); default: its defaults")
    p.add_argument("--variants", default='{"default": {}}',
                   help='JSON {name: config overrides}: every job runs once per variant (default: one, the config)')
    p.add_argument("--data", nargs="+", choices=["resident", "host"], default=["resident"])
    p.add_argument("--train-epochs", nargs=2, type=int, default=[1, 3], metavar=("A", "B"))
    p.add_argument("--measure-retrain", action="store_true", help="also train the first setting's gold standard")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: the suite's)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    suite = bench.SUITES[args.suite]
    device, recipe = bench.suite_runtime(suite, args.device)
    spec = suite["benchmarks"][args.benchmark]
    cache_dir = Path(args.cache_dir) / args.suite  # where the bench keeps the suite's models
    unknown = sorted(set(args.settings or []) - set(bench.setting_labels(suite, spec)))
    if unknown:  # before rendering and loading anything
        raise SystemExit(f"no setting of {args.suite} is named {', '.join(unknown)}; "
                         f"its settings: {', '.join(bench.setting_labels(suite, spec))}")
    entry = bench.cache_entry(cache_dir, recipe, bench.original_key(spec))
    if args.require_cached and not (entry / "bench.json").is_file():
        raise SystemExit(f"--require-cached: the {args.suite} suite's {args.benchmark} original is not in {entry} "
                         f"(give the --cache-dir the bench ran with; its models are in <cache-dir>/{args.suite})")
    t0 = time.perf_counter()
    train, test = load_splits(spec, render_workers="auto")
    render_seconds = time.perf_counter() - t0
    original, original_seconds = bench.cached_original(cache_dir, train, spec, recipe, device)

    plan = bench.settings(train, suite, args.seeds or suite["seeds"])
    if args.settings:
        plan = [st for st in plan if bench.setting_label(st) in args.settings]

    steps = step_seconds(train, recipe, device, tuple(args.train_epochs))
    measured = None
    if args.measure_retrain:
        st = plan[0]
        _, seconds = bench.cached_retrain(cache_dir, train, spec, st["cells"], recipe, device)
        measured = {"setting": bench.setting_label(st), "seed": st["seed"], "seconds": round(seconds, 3)}

    config = json.loads(args.config)
    variants = json.loads(args.variants)
    out = {
        **bench.provenance(device),
        "suite": args.suite,
        "benchmark": spec,
        "recipe": asdict(recipe),
        "method": args.method,
        "config": config,
        "variants": variants,
        "render_seconds": round(render_seconds, 2),
        "original_seconds": original_seconds,
        "train_steps": steps,
        "retrain_measured": measured,
        "complete": False,
        "warmup": [],
        "jobs": [],
    }

    def write() -> None:  # after every job: a run cut off (a time-limited device) keeps what it measured
        if device.type == "cuda":
            out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        write_json(args.out, out)

    caches = {mode: {} for mode in args.data}
    first_variant = next(iter(variants.values()), {})
    short = {"steps": 2} if "steps" in method_defaults(args.method) else {}
    for mode in args.data:  # untimed: the per-version cache's fill and first-call costs (module doc)
        _sync(device)
        t0 = time.perf_counter()
        run_unlearning_job(original, train, test, plan[0]["cells"], method=args.method,
                           config={**config, **first_variant, **short}, device=device, seed=int(plan[0]["seed"]),
                           cache=caches[mode], keep_data_on_device=mode == "resident")
        _sync(device)
        out["warmup"].append({"data": mode, "config": short, "seconds": round(time.perf_counter() - t0, 3)})
        write()
    for st in plan:
        # the gold standard trains on the instances left with a supervised cell
        retrain_estimate = steps["seconds_per_step"] * training_steps(len(train.without(st["cells"])), recipe)
        for (name, overrides), mode in itertools.product(variants.items(), args.data):
            result = run_unlearning_job(original, train, test, st["cells"], method=args.method,
                                        config={**config, **overrides}, device=device, seed=int(st["seed"]),
                                        cache=caches[mode], keep_data_on_device=mode == "resident")
            m = result.metrics
            job = round(m["seconds"] - m["cache_seconds"], 3)
            out["jobs"].append({
                "setting": bench.setting_label(st), "seed": st["seed"], "variant": name, "data": mode,
                "seconds": job, "cache_seconds": m["cache_seconds"],
                "unlearn_seconds": m["unlearn_seconds"], "eval_seconds": m["eval_seconds"],
                "uis": m["uis"], "mia_auc": m["mia_auc"], "mia_auc_original": m["mia_auc_original"],
                "retrain_seconds_estimate": round(retrain_estimate, 2),
                "speed_up_estimate": round(retrain_estimate / job, 1),
                "speed_up_measured": round(measured["seconds"] / job, 1) if measured else None,
            })
            print(json.dumps(out["jobs"][-1]), flush=True)
            write()
    out["complete"] = True
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
