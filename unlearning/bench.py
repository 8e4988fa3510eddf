"""The unlearning benchmark: every method against the retrained gold standard.

    python -m unlearning.bench --suite smoke --out benchmarks/smoke.json

For each benchmark (``indoor``: segmentation, depth, normals; ``street``:
segmentation, depth) the original model is trained once (cached under
``--cache-dir``, keyed by dataset spec and recipe). Then for each setting

- ``full``: ``n_forget`` ∈ {1, 8} instances erased from every task,
- ``partial``: 8 instances erased from one task, each task in turn,

and each seed (the seed picks the forgotten instances and seeds the methods),
the gold standard is retrained from scratch on the retain cells with the
original recipe (cached by key), every method runs on the original model, and
:func:`unlearning.evaluate.evaluate_unlearning` scores it.

Timing. ``seconds`` is what a job does: the method's ``unlearn`` call
(``unlearn_seconds``) plus the evaluation of its result (``eval_seconds``: UIS
and MIA AUC, as the service's jobs do). What a model version caches
(interference_aware's τ, its shadow calibration, task subspaces and
representation features; ssd's importance ``I_d`` over the training data; the
original model's evaluation numbers) is computed
once per benchmark before any timed run and reported as ``prepare_seconds``
in the config. ``retrain_seconds`` is the gold standard's training time
(measured when it was trained, kept in its cache manifest). The ``retrain``
method's row *is* the gold standard (the same recipe and seed give the same
model), so its ``unlearn_seconds`` are ``retrain_seconds``.

interference_aware receives the suite's training recipe as ``shadow_recipe``
(the deployed model's recipe, which the service keeps in the model manifest)
and calibrates its reference levels with shadow models trained with it once
per model version; ``--no-shadow`` withholds it.

The methods' held-out data (interference_aware's reference levels τ, their
refreshes and its shadow calibration) is by default the test split, which is
also where the membership attack takes its non-members. ``--reference-scenes N``
gives the methods N other held-out scenes instead (the ones the renderer makes
after the test split's, so the test split and every cached model are unchanged),
so that a method is not tuned on the scenes it is then scored against.

Writes the JSON results, a markdown summary (``.md``) and a plot (``.png``)
next to ``--out``; while it runs, the JSON alone, marked ``"incomplete": true``,
after every setting, so a run that is cut off keeps the settings it finished.

A suite too long for one sitting (``full`` on a time-limited GPU) runs in pieces
(``--benchmarks``, ``--seeds``, ``--settings``, ``--methods``) that share ``--cache-dir``;

    python -m unlearning.bench --merge piece1.json piece2.json ... --out benchmarks/full.json

pools their results into one document, table and plot (:func:`merge`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .data import dataset_tasks, load_reference, load_splits
from .evaluate import EvalContext, evaluate_unlearning, membership_auc
from .methods import METHOD_NAMES, UnlearnData, get_method, prepare_method
from .model import load_model, save_model
from .cli import (INTERRUPTED, METHOD_SEEDS, CliError, check_creatable, check_seed, cli_device, json_type, read_json,
                  report_cli_error)
from .train import TrainConfig, resident, resolve_device, train_model

DEFAULT_METHOD = "interference_aware"
# Not a method: the gold standard's recipe with another initialisation seed. How far
# two retrained models disagree on the forget cells is the noise floor of every
# comparison with ``mia_auc_retrain``.
INDEPENDENT_RETRAIN = "retrain_independent"

SUITES: dict[str, dict] = {
    # Sized for 2 shared CPU cores (one torch thread) in under 20 minutes: small
    # images, 80 training scenes and a long enough schedule that the original
    # model memorises them (membership inference on it is clearly above chance).
    "smoke": {
        "benchmarks": {
            "indoor": {"name": "indoor", "n_train": 80, "n_test": 48, "height": 24, "width": 32, "seed": 0},
            "street": {"name": "street", "n_train": 80, "n_test": 48, "height": 24, "width": 32, "seed": 0},
        },
        "train": {"epochs": 60, "batch_size": 16, "lr": 4e-3, "width": 16, "depth": 3, "head_width": 16, "seed": 0},
        "seeds": [0, 1],
        "n_forget_full": [1, 8],
        "n_forget_partial": 8,
        "retained_sample_size": 64,
        "threads": 1,
        "device": "cpu",
    },
    # The speed-up at NYUv2's instance count on CPU: full's 795 training scenes and a
    # 200-epoch schedule, smoke's image size and model, two seeds, one full (8 instances)
    # and one partial (depth) setting.
    "scale": {
        "benchmarks": {
            "indoor": {"name": "indoor", "n_train": 795, "n_test": 96, "height": 24, "width": 32, "seed": 0},
        },
        "train": {"epochs": 200, "batch_size": 16, "lr": 4e-3, "width": 16, "depth": 3, "head_width": 16, "seed": 0},
        "seeds": [0, 1],
        "n_forget_full": [8],
        "n_forget_partial": 8,
        "partial_tasks": ["depth"],
        "retained_sample_size": 64,
        "threads": 1,
        "device": "cpu",
    },
    # GPU-sized, NYUv2-like scale (795 train / 654 test scenes at 288x384, a long
    # schedule so that the original memorises). Too long for a CPU; what one GPU
    # session measured of it: "The `full` suite on a GPU" in benchmarks/README.md.
    "full": {
        "benchmarks": {
            "indoor": {"name": "indoor", "n_train": 795, "n_test": 654, "height": 288, "width": 384, "seed": 0},
            "street": {"name": "street", "n_train": 795, "n_test": 500, "height": 256, "width": 512, "seed": 0},
        },
        "train": {"epochs": 200, "batch_size": 8, "lr": 1e-3, "width": 32, "depth": 4, "head_width": 32, "seed": 0},
        # two seeds, as smoke and scale (the issue asks for at least two): each is 9 gold
        # standards of ~20,000 steps, so a third would add half again to the GPU time
        "seeds": [0, 1],
        "n_forget_full": [1, 8],
        "n_forget_partial": 8,
        "retained_sample_size": 128,
        "threads": None,
        "device": "auto",
    },
}


# ----------------------------------------------------------------------------- settings and caching


def settings(train, suite: dict, seeds: list[int]) -> list[dict]:
    """Every (setting, forget tasks, n_forget, seed) with its forget cells.

    The seed draws a permutation of the training instances; a setting with
    ``n`` instances takes the first ``n`` (so the 1-instance set is inside the
    8-instance set of the same seed)."""
    out = []
    for seed in seeds:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(10_007 + int(seed))).tolist()
        ids = [train.instance_ids[i] for i in order]
        for n in suite["n_forget_full"]:
            chosen = ids[:n]
            out.append({"setting": "full", "forget_tasks": list(train.tasks), "n_forget": n, "seed": seed,
                        "cells": [(i, t) for i in chosen for t in train.tasks]})
        n = suite["n_forget_partial"]
        for task in suite.get("partial_tasks", train.tasks):
            out.append({"setting": "partial", "forget_tasks": [task], "n_forget": n, "seed": seed,
                        "cells": [(i, task) for i in ids[:n]]})
    return out


class UnknownSettings(ValueError):
    """``only_settings`` names a setting the suite does not have."""


def setting_label(st: dict) -> str:
    """``full:<n_forget>`` or ``partial:<task>``: how ``--settings`` names a setting."""
    return f"full:{st['n_forget']}" if st["setting"] == "full" else f"partial:{st['forget_tasks'][0]}"


def setting_labels(suite: dict, spec: dict) -> list[str]:
    """The :func:`setting_label` of every setting of ``suite`` on the benchmark ``spec``, from
    the suite's definition alone (nothing is rendered or loaded)."""
    return ([f"full:{n}" for n in suite["n_forget_full"]]
            + [f"partial:{t}" for t in suite.get("partial_tasks", dataset_tasks(spec))])


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_entry(cache_dir: Path, recipe: TrainConfig, key_payload: dict) -> Path:
    """The folder :func:`cached_training` keeps the model of ``recipe`` and ``key_payload`` in
    (a finished entry holds ``bench.json``)."""
    return cache_dir / _key({**key_payload, "recipe": asdict(recipe)})


ORIGINAL = {"cells": "all"}  # the key payload of a benchmark's original model, beside its spec


def cached_training(cache_dir: Path, dataset, recipe: TrainConfig, key_payload: dict, device,
                    trained_on: dict | None = None) -> tuple[torch.nn.Module, float]:
    """Train on ``dataset`` with ``recipe`` or load the model cached under the key; returns
    ``(model, training seconds)`` (the seconds measured when it was trained, on the device
    its ``bench.json`` names). ``trained_on`` (device name -> count) counts where the model
    was trained: a cache copied from another machine holds other models (another CPU's
    instruction set trains others from the same seeds) and other training seconds."""
    directory = cache_entry(cache_dir, recipe, key_payload)
    meta_path = directory / "bench.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        where = meta.get("device", "unrecorded")  # entries from before the field
        model, seconds = load_model(directory, map_location=device).eval(), float(meta["seconds"])
    else:
        start = time.perf_counter()
        model = train_model(dataset, recipe, device=device, progress=False)
        seconds = time.perf_counter() - start
        save_model(model, directory, extra={"train": asdict(recipe)})
        where = _device_name(device)
        meta_path.write_text(json.dumps({"seconds": seconds, "key": key_payload, "device": where,
                                         "torch": torch.__version__}, default=str))
        model = model.eval()
    if trained_on is not None:
        trained_on[where] = trained_on.get(where, 0) + 1
    return model, seconds


def suite_runtime(suite: dict, device=None) -> tuple[torch.device, TrainConfig]:
    """The device a suite runs on (``device``, else the suite's) and its training
    recipe; on CPU, sets torch's thread count to the suite's ``threads``."""
    device = resolve_device(device or suite["device"])
    if suite.get("threads") and device.type == "cpu":
        # Several torch threads on a shared CPU oversubscribe it and run many times slower.
        torch.set_num_threads(int(suite["threads"]))
    return device, TrainConfig(**suite["train"])


def original_key(spec: dict) -> dict:
    """The cache key payload of ``spec``'s original model, which every script shares."""
    return {"spec": spec, **ORIGINAL}


def cached_original(cache_dir: Path, train, spec: dict, recipe: TrainConfig, device,
                    trained_on: dict | None = None) -> tuple[torch.nn.Module, float]:
    """:func:`cached_training` of the benchmark's original model: ``recipe`` on all of
    ``train`` (the training split of ``spec``), under :func:`original_key`."""
    return cached_training(cache_dir, train, recipe, original_key(spec), device, trained_on)


def independent_recipe(recipe: TrainConfig) -> TrainConfig:
    """The gold standard's recipe with the next initialisation seed (``retrain_independent``)."""
    return replace(recipe, seed=recipe.seed + 1)


def cached_retrain(cache_dir: Path, train, spec: dict, cells, recipe: TrainConfig, device,
                   retain=None, trained_on: dict | None = None) -> tuple[torch.nn.Module, float]:
    """:func:`cached_training` of ``recipe`` on ``train`` without ``cells`` (``retain``
    when the caller has it), keyed by the benchmark spec and the cells: the gold
    standard, or with :func:`independent_recipe` the independent retrain."""
    retain = train.without(cells) if retain is None else retain
    return cached_training(cache_dir, retain, recipe, {"spec": spec, "forget": sorted(map(list, cells))}, device,
                           trained_on)


def calibrate_shadows(data: UnlearnData, original, config: dict, cache_dir: Path, spec: dict, device) -> dict | None:
    """interference_aware's shadow calibration for ``config`` (None without ``shadow_recipe``
    or with given ``shadow_scores``), put in ``data.cache`` where its ``prepare`` finds it.
    Every shadow is a :func:`cached_retrain` (a shadow is a retrain without a fold's cells):
    trained once, kept in the cache like the gold standards, so a run that is cut off
    keeps the shadows it finished and a later one loads them."""
    from .methods.interference_aware import DEFAULTS as IA_DEFAULTS, shadow_scores

    cfg = {**IA_DEFAULTS, **config}
    if not cfg["shadow_recipe"] or cfg["shadow_scores"] or cfg["tau"]:
        return None
    return shadow_scores(original, data, cfg["shadow_recipe"], cfg["shadow_folds"], cfg["shadow_seed"],
                         trained_folds=cfg["shadow_trained_folds"], extrapolate=cfg["shadow_extrapolate"],
                         trainer=shadow_trainer(cache_dir, data.train, spec, device))


def shadow_trainer(cache_dir: Path, train, spec: dict, device):
    """The ``trainer`` of interference_aware's ``shadow_scores`` that keeps every shadow in
    the bench cache: a shadow is a :func:`cached_retrain` without its fold's cells, so the
    bench and the calibration scripts train each one once."""
    return lambda cells, recipe: cached_retrain(cache_dir, train, spec, cells, recipe, device)[0]


def reference_split(spec: dict, n: int):
    """``n`` held-out scenes of a synthetic benchmark that are not in its test split
    (:func:`unlearning.data.load_reference`, rendered in parallel)."""
    return load_reference(spec, n, render_workers="auto")


_SPLITS: dict[str, tuple] = {}


def _pretrain(cache_dir: str, spec: dict, recipe: dict, cells: list, threads: int | None, device: str) -> float:
    """In a worker process: train (or find cached) the model ``recipe`` makes on the
    benchmark's training data without ``cells``, as :func:`run_suite` would; returns
    its training seconds. The data is rendered once per worker and spec."""
    if threads:
        torch.set_num_threads(int(threads))
    key = json.dumps(spec, sort_keys=True)
    if key not in _SPLITS:
        _SPLITS[key] = load_splits(spec, render_workers="auto")
    train = _SPLITS[key][0]
    _, seconds = cached_retrain(Path(cache_dir), train, spec, [tuple(c) for c in cells], TrainConfig(**recipe),
                                torch.device(device))
    return seconds


def _num(x):
    if x is None:
        return None
    x = float(x)
    return None if not math.isfinite(x) else round(x, 6)  # strict JSON: a diverged run's inf too


# ----------------------------------------------------------------------------- the run


def benchmarks_with_settings(suite_name: str, names: list[str], only_settings: list[str]) -> list[str]:
    """The benchmarks of ``names`` that have one of ``only_settings`` (labels of
    :func:`setting_label`); :class:`UnknownSettings` for a label none of them has."""
    suite = SUITES[suite_name]
    labels = {b: setting_labels(suite, suite["benchmarks"][b]) for b in names}
    known = list(dict.fromkeys(x for b in names for x in labels[b]))
    unknown = [x for x in only_settings if x not in known]
    if unknown or not only_settings:
        raise UnknownSettings(f"unknown settings {unknown} for suite {suite_name!r}; its settings: {known}")
    return [b for b in names if set(labels[b]) & set(only_settings)]


def run_suite(suite_name: str, methods: list[str], seeds: list[int] | None, cache_dir: Path, device=None,
              benchmarks: list[str] | None = None, method_configs: dict | None = None, progress: bool = True,
              shadow: bool = True, engine_caches: dict | None = None, independent_retrain: bool = True,
              workers: int = 0, only_settings: list[str] | None = None,
              on_update: Callable[[dict], None] | None = None, reference_scenes: int = 0) -> dict:
    """Run a suite and return the results document (see the module docstring).

    ``engine_caches`` (benchmark name -> dict) lets a caller that runs several
    suites on the same original models (a tuning loop) keep what the methods
    cache per model version between runs. ``workers`` > 0 trains the gold
    standards (and independent retrains) ahead, in that many worker processes
    (the suite's thread count each), while this process trains the originals,
    prepares the per-version state and runs the methods; the results are the
    same models (training is seeded), only the wall time changes. ``only_settings``
    (labels of :func:`setting_label`, e.g. ``["full:8", "partial:depth"]``) runs those
    settings alone. ``on_update`` gets the document so far after every setting, so a
    run that is cut off keeps what it finished. ``reference_scenes`` > 0 gives the methods
    that many held-out scenes of their own (:func:`reference_split`) in place of the test
    split, which stays the attack's non-members and the metrics' data."""
    suite = SUITES[suite_name]
    seeds = list(suite["seeds"] if seeds is None else seeds)
    device, recipe = suite_runtime(suite, device)
    method_configs = dict(method_configs or {})
    if shadow and DEFAULT_METHOD in methods:
        # interference_aware may calibrate its reference levels with a shadow model trained
        # with the deployed model's recipe (the service keeps it in the model's manifest).
        method_configs[DEFAULT_METHOD] = {"shadow_recipe": asdict(recipe), **method_configs.get(DEFAULT_METHOD, {})}
    names = [b for b in suite["benchmarks"] if benchmarks is None or b in benchmarks]
    run_methods = list(methods) + ([INDEPENDENT_RETRAIN] if independent_retrain else [])

    if only_settings is not None:
        # checked, and the benchmarks without a chosen setting dropped, before anything is rendered
        names = benchmarks_with_settings(suite_name, names, only_settings)

    loaded = {b: load_splits(suite["benchmarks"][b], render_workers="auto") for b in names}
    references = {b: reference_split(suite["benchmarks"][b], reference_scenes) for b in names} if reference_scenes else {}
    plan = [(b, s) for b in names for s in settings(loaded[b][0], suite, seeds)]
    if only_settings is not None:
        plan = [(b, st) for b, st in plan if setting_label(st) in only_settings]
    pretrained: dict = {}
    pool = None
    if workers > 0:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a forked child would inherit torch's thread pools
        pool = ProcessPoolExecutor(max_workers=int(workers), mp_context=multiprocessing.get_context("spawn"))
        for k, (bench, st) in enumerate(plan):
            recipes = [("gold", recipe)] + ([("independent", independent_recipe(recipe))] if independent_retrain else [])
            for kind, r in recipes:
                pretrained[(k, kind)] = pool.submit(_pretrain, str(cache_dir), suite["benchmarks"][bench], asdict(r),
                                                    st["cells"], suite.get("threads"), str(device))
    results, prepare_seconds, original_seconds = [], {}, {}
    trained_on: dict[str, int] = {}  # the original, gold standards and independent retrains, by training device

    def document() -> dict:  # the results so far, with the run's configuration
        return {
            "suite": suite_name,
            "config": {
                **{k: v for k, v in suite.items() if k != "seeds"},
                "seeds": seeds,
                "methods": methods,
                "method_configs": method_configs,
                "prepare_seconds": prepare_seconds,
                "original_seconds": {b: round(s, 3) for b, s in original_seconds.items()},
                "models_trained_on": dict(trained_on),
                "workers": int(workers),
                "settings": None if only_settings is None else list(only_settings),
                "torch": torch.__version__,
                # only when given: documents from before the option merge with a run without it
                **({"reference_scenes": int(reference_scenes)} if reference_scenes else {}),
            },
            "device": _device_name(device),
            "results": results,
        }

    try:
        bar = tqdm(total=len(plan) * len(run_methods), desc=f"bench {suite_name}", disable=not progress)
        current = None
        for k, (bench, st) in enumerate(plan):
            spec = suite["benchmarks"][bench]
            if current != bench:
                current = bench
                # on a CUDA device the benchmark's data stays there for its trainings and jobs
                # (train.resident; the previous benchmark's copy is let go); on a CPU, as it is
                train, test = (resident(x, device) for x in loaded[bench])
                # the methods' held-out data: the test split, or scenes of their own
                heldout = resident(references[bench], device) if references else test
                bar.set_postfix_str(f"{bench}: original model")
                original, original_seconds[bench] = cached_original(cache_dir, train, spec, recipe, device, trained_on)
                # Per-model-version state, computed once and not counted in any job's seconds.
                t0 = time.perf_counter()
                context = EvalContext(original, train, test, retained_sample_size=suite["retained_sample_size"],
                                      device=device).warm()
                engine_cache: dict = {} if engine_caches is None else engine_caches.setdefault(bench, {})
                warm = UnlearnData(train, [train.cells()[0]], train, heldout=heldout, device=device, cache=engine_cache)
                calibrate_shadows(warm, original, method_configs.get(DEFAULT_METHOD, {}) if DEFAULT_METHOD in methods
                                  else {}, cache_dir, spec, device)
                for method in methods:
                    prepare_method(method, original, warm, method_configs.get(method, {}))
                prepare_seconds[bench] = round(time.perf_counter() - t0, 3)

            cells = st["cells"]
            retain = train.without(cells)
            label = f"{bench} {st['setting']} {st['forget_tasks'] if st['setting'] == 'partial' else st['n_forget']} s{st['seed']}"
            bar.set_postfix_str(f"{label}: retrain")
            if (k, "gold") in pretrained:
                pretrained[(k, "gold")].result()  # trained by a worker: cached_training loads it
            gold, retrain_seconds = cached_retrain(cache_dir, train, spec, cells, recipe, device, retain=retain,
                                                   trained_on=trained_on)
            mia_retrain, gold_members = membership_auc(gold, train, cells, test, device)

            for method in run_methods:
                bar.set_postfix_str(f"{label}: {method}")
                data = UnlearnData(train, cells, retain, heldout=heldout, device=device, seed=int(st["seed"]),
                                   cache=engine_cache)
                if method == "retrain":
                    unlearned, unlearn_seconds = gold, retrain_seconds
                elif method == INDEPENDENT_RETRAIN:
                    if (k, "independent") in pretrained:
                        pretrained[(k, "independent")].result()
                    unlearned, unlearn_seconds = cached_retrain(cache_dir, train, spec, cells, independent_recipe(recipe),
                                                                device, retain=retain, trained_on=trained_on)
                else:
                    cfg = dict(method_configs.get(method, {}))
                    start = time.perf_counter()
                    unlearned, _ = get_method(method)(original, data, cfg)
                    unlearn_seconds = time.perf_counter() - start
                # A job evaluates what it produced (UIS, MIA AUC), so that is counted too; each run
                # with the per-version cache only (the request's own retained sample is its work).
                start = time.perf_counter()
                ev = evaluate_unlearning(original, unlearned, train, cells, test, context=context.per_version(),
                                         device=device, retrained_forget_losses=gold_members)
                eval_seconds = time.perf_counter() - start
                seconds = unlearn_seconds + eval_seconds
                results.append({
                    "benchmark": bench,
                    "setting": st["setting"],
                    "forget_tasks": st["forget_tasks"],
                    "n_forget": st["n_forget"],
                    "seed": st["seed"],
                    "method": method,
                    "uis": _num(ev["uis"]),
                    "uis_task": _num(ev["uis_task"]),
                    "uis_inst": _num(ev["uis_inst"]),
                    "mia_auc": _num(ev["mia_auc"]),
                    "mia_auc_original": _num(ev["mia_auc_original"]),
                    "mia_auc_retrain": _num(mia_retrain),
                    "forget_gap": _num(ev["forget_gap"]),
                    "seconds": round(seconds, 4),
                    "unlearn_seconds": round(unlearn_seconds, 4),
                    "eval_seconds": round(eval_seconds, 4),
                    "retrain_seconds": round(retrain_seconds, 4),
                })
                bar.update(1)
            if on_update is not None:
                on_update(document())
        bar.close()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return document()


def _cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device) -> str:
    """Where the figures were measured. On CPU the trained models themselves depend on
    the kernels torch picks for the instruction set (AVX2, AVX512, ...): the same
    seeds give other models, and other UIS and MIA figures, on another CPU."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return (f"cpu: {platform.machine()}, {_cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} torch thread(s)")


def provenance(device) -> dict:
    """What a measurement script's JSON starts with: the command that wrote it (as typed,
    quoted), where it ran (:func:`_device_name`) and the torch version."""
    return {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "device": _device_name(device),
            "torch": torch.__version__}


# ----------------------------------------------------------------------------- summary


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _mean(xs):
    """The mean; NaN when any value is missing or NaN. A diverged run has UIS NaN
    (:func:`unlearning.metrics.relative_degradation`): averaged over its other runs
    only, a method that diverges on some seeds would look as good as its good runs."""
    xs = list(xs)
    return float("nan") if not xs or any(_missing(x) for x in xs) else sum(xs) / len(xs)


def _rank(x) -> float:
    """Sort key: a missing or NaN figure ranks last."""
    return math.inf if _missing(x) else x


def _mia_err(r: dict) -> float | None:
    """A run's |mia_auc − mia_auc_retrain|; None (missing: the means become NaN) without either."""
    return None if _missing(r["mia_auc"]) or _missing(r["mia_auc_retrain"]) else abs(r["mia_auc"] - r["mia_auc_retrain"])


def aggregate(results: list[dict]) -> dict:
    """``{(benchmark, setting, n_forget): {method: means}}``: means over seeds (and, in
    partial mode, over the forgotten task). ``mia_err`` is the mean over runs of
    ``|mia_auc - mia_auc_retrain|``; ``speedup`` is ``retrain_seconds / seconds``."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["benchmark"], r["setting"], r["n_forget"]), {}).setdefault(r["method"], []).append(r)
    out = {}
    for key, by_method in groups.items():
        out[key] = {}
        for m, rows in by_method.items():
            out[key][m] = {
                "runs": len(rows),
                **{f: _mean([r[f] for r in rows]) for f in
                   ("uis", "uis_task", "uis_inst", "mia_auc", "mia_auc_original", "mia_auc_retrain", "forget_gap",
                    "seconds", "retrain_seconds")},
                "mia_err": _mean([_mia_err(r) for r in rows]),
                "speedup": _mean([None if _missing(r["retrain_seconds"]) else r["retrain_seconds"] / r["seconds"]
                                  for r in rows if r["seconds"] and not _missing(r["seconds"])]),
            }
    return out


def _forget_set(r: dict) -> tuple:
    return tuple(r["forget_tasks"]), r["n_forget"], r["seed"]


def common_runs(runs: list[dict]) -> tuple[list[dict], int]:
    """``runs`` (of one benchmark and setting) on the forget sets that every method among
    them ran, but the gold standard and the independent retrain (references, not compared);
    and how many forget sets were left out. A merge of pieces that ran other ``--methods``
    (ours on both seeds, a baseline on one) pooled each method over other forget sets."""
    methods = {r["method"] for r in runs} - {"retrain", INDEPENDENT_RETRAIN}
    ran: dict[tuple, set] = {}
    for r in runs:
        ran.setdefault(_forget_set(r), set()).add(r["method"])
    keep = {k for k, ms in ran.items() if ms >= methods}
    return [r for r in runs if _forget_set(r) in keep], len(ran) - len(keep)


def headline(results: list[dict], ours: str = DEFAULT_METHOD) -> list[dict]:
    """Per benchmark and setting (all of its runs pooled): our UIS against the strongest
    baseline, the baseline with the lowest mean UIS among those whose forgetting is at
    least as good (mean ``|mia_auc - mia_auc_retrain|`` no larger than ours). ``retrain``
    is the gold standard, not a baseline. Also the lowest-UIS baseline regardless of
    forgetting, for reference. Only the forget sets every compared method ran are pooled
    (:func:`common_runs`; ``left_out`` counts the others)."""
    pooled: dict = {}
    for r in results:
        pooled.setdefault((r["benchmark"], r["setting"]), []).append(r)
    rows = []
    for (bench, setting), runs in sorted(pooled.items()):
        runs, left_out = common_runs(runs)
        if not runs:
            continue
        agg = aggregate([{**r, "n_forget": 0} for r in runs])[(bench, setting, 0)]
        if ours not in agg:
            continue
        me = agg[ours]
        baselines = {m: v for m, v in agg.items() if m not in (ours, "retrain", INDEPENDENT_RETRAIN)}
        independent = agg.get(INDEPENDENT_RETRAIN)
        eight_independent = [r for r in runs if r["n_forget"] == 8 and r["method"] == INDEPENDENT_RETRAIN]
        eligible = {m: v for m, v in baselines.items()
                    if v["mia_err"] <= me["mia_err"] + 1e-9 and not _missing(v["uis"])}
        strongest = min(eligible, key=lambda m: eligible[m]["uis"]) if eligible else None
        lowest = min(baselines, key=lambda m: _rank(baselines[m]["uis"])) if baselines else None
        closest = (min(baselines, key=lambda m: (_rank(baselines[m]["mia_err"]), _rank(baselines[m]["uis"])))
                   if baselines else None)

        def reduction(m):
            if m is None or _missing(baselines[m]["uis"]) or _missing(me["uis"]):
                return None
            if baselines[m]["uis"] == 0:  # nothing is lower than 0: no reduction, or ours is infinitely higher
                return 0.0 if me["uis"] == 0 else -math.inf
            return 100.0 * (1.0 - me["uis"] / baselines[m]["uis"])

        eight = [r for r in runs if r["n_forget"] == 8 and r["method"] == ours]
        rows.append({
            "benchmark": bench, "setting": setting, "uis": me["uis"], "mia_err": me["mia_err"],
            "strongest": strongest, "strongest_uis": eligible[strongest]["uis"] if strongest else None,
            "reduction": reduction(strongest),
            "lowest_uis_baseline": lowest, "lowest_uis": baselines[lowest]["uis"] if lowest else None,
            "reduction_vs_lowest": reduction(lowest),
            "closest_baseline": closest, "closest_uis": baselines[closest]["uis"] if closest else None,
            "closest_mia_err": baselines[closest]["mia_err"] if closest else None, "reduction_vs_closest": reduction(closest),
            "mia8": _mean([r["mia_auc"] for r in eight]), "mia8_retrain": _mean([r["mia_auc_retrain"] for r in eight]),
            "mia8_original": _mean([r["mia_auc_original"] for r in eight]),
            "independent_mia_err": independent["mia_err"] if independent else None,
            "mia8_independent": _mean([r["mia_auc"] for r in eight_independent]) if eight_independent else None,
            "speedup": me["speedup"], "left_out": left_out,
        })
    return rows


def _f(x, nd=2):
    if isinstance(x, float) and math.isinf(x):
        return "−∞" if x < 0 else "∞"
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def mia_readings(results: list[dict], ours: str = DEFAULT_METHOD, n: int = 8) -> list[dict]:
    """The MIA target ("within 0.03 of the retrained model on forget sets of ``n``,
    averaged over seeds") read three ways, per benchmark and setting, for ``ours``, over
    the forget sets the headline pools (:func:`common_runs`):

    - ``of_means``: |mean MIA − mean MIA of the gold standard| over every forget set of
      ``n`` (seeds, and in partial erasure the forgotten tasks, pooled): the headline's
      reading, in which errors of opposite sign cancel;
    - ``per_set``: the mean over those forget sets of |MIA − MIA of the gold standard|
      (no cancelling);
    - ``per_task``: ``{task: |mean − mean|}`` over seeds, one forgotten task at a time
      (partial erasure; full erasure forgets every task at once: one entry, ``"all"``).

    A run without an AUC makes its figures NaN, as the headline's (never averaged away).
    """
    pooled: dict = {}
    for r in results:
        pooled.setdefault((r["benchmark"], r["setting"]), []).append(r)
    rows = []
    for (bench, setting), runs in sorted(pooled.items()):
        runs = [r for r in common_runs(runs)[0] if r["method"] == ours and r["n_forget"] == n]
        if not runs:
            continue
        by_task: dict = {}
        for r in runs:
            by_task.setdefault("all" if setting == "full" else "+".join(r["forget_tasks"]), []).append(r)

        def of_means(rs):
            return abs(_mean([r["mia_auc"] for r in rs]) - _mean([r["mia_auc_retrain"] for r in rs]))

        rows.append({
            "benchmark": bench, "setting": setting, "sets": len(runs), "of_means": of_means(runs),
            "per_set": _mean([_mia_err(r) for r in runs]),
            "per_task": {t: of_means(rs) for t, rs in sorted(by_task.items())},
        })
    return rows


def _elsewhere(doc: dict) -> list[str]:
    """A note when the cache held models trained on another device than the run's (their
    training seconds, the speed-ups' denominators, are that device's)."""
    counts = doc["config"].get("models_trained_on") or {}
    other = {d: n for d, n in counts.items() if d not in (doc["device"], "unrecorded")}
    lines = []
    if other:
        lines += [f"Models loaded from the cache that were trained on another device (their `retrain_seconds` are "
                  f"that device's): {', '.join(f'{n} on {d}' for d, n in sorted(other.items()))}", ""]
    if counts.get("unrecorded"):
        lines += [f"{counts['unrecorded']} models loaded from cache entries that do not record the device that "
                  "trained them (written before the cache recorded it)", ""]
    return lines


def _pooled_words(doc: dict) -> str:
    """What the headline pools, in words, from the runs themselves: the full-erasure forget
    sizes, and the forgotten tasks of partial erasure ("every task" when each benchmark's
    partial runs forget each of its tasks). A fixed sentence said "1 and 8 instances;
    every task" of the ``scale`` run too, which has sets of 8 and depth alone."""
    res = doc["results"]
    parts = []
    sizes = sorted({r["n_forget"] for r in res if r["setting"] == "full"})
    if sizes:
        parts.append("full: " + " and ".join(str(n) for n in sizes) + (" instance" if sizes == [1] else " instances"))
    partial = {}
    for r in res:
        if r["setting"] == "partial":
            partial.setdefault(r["benchmark"], set()).update(r["forget_tasks"])
    if partial:
        specs = (doc.get("config") or {}).get("benchmarks") or {}
        try:
            every = all(set(dataset_tasks(specs[b])) == tasks for b, tasks in partial.items())
        except (KeyError, ValueError):  # a document without the specs: name the tasks
            every = False
        parts.append("partial: " + ("every task" if every else ", ".join(sorted(set().union(*partial.values())))))
    return "; ".join(parts) or "no runs"


def markdown(doc: dict) -> str:
    """The summary: headline per benchmark and setting, then every method's means."""
    res = doc["results"]
    lines = [f"# Unlearning benchmark: `{doc['suite']}` suite", "",
             f"Command: `{doc.get('command', '')}`  ", f"Device: {doc['device']}  ",
             f"Wall time: {_f(doc.get('wall_seconds', float('nan')), 0)} s  ",
             f"Seeds: {doc['config']['seeds']}; runs: {len(res)}", "",
             *_elsewhere(doc),
             *(["Pieces (their wall times add up to the one above):", "",
                *[f"- `{p['source']}`: `{p['command']}`, {_f(p['wall_seconds'], 0)} s"
                  + (" (cut off: only the settings with rows in the table ran)" if p.get("incomplete") else "")
                  for p in doc["config"]["pieces"]],
                ""] if doc["config"].get("pieces") else []),
             "## Headline (interference_aware vs the strongest baseline)", "",
             "Strongest baseline: lowest mean UIS among baselines whose mean |mia_auc − mia_auc_retrain| is no "
             "larger than interference_aware's (retrain is the gold standard, not a baseline); `none` when no baseline forgets as well. "
             "Best-forgetting baseline: the one with the lowest mean |ΔMIA| (for reference when the strongest is `none`). All runs of the "
             f"setting pooled ({_pooled_words(doc)}). MIA columns: forget sets of 8, means over seeds. "
             f"`{INDEPENDENT_RETRAIN}`: the gold standard's recipe with another initialisation seed; its |ΔMIA| is how far two "
             "retrained models disagree (the noise floor of every |ΔMIA|).", "",
             "| benchmark | setting | UIS (ours) | \\|ΔMIA\\| (ours) | \\|ΔMIA\\| independent retrain | strongest baseline | its UIS | UIS reduction | "
             "lowest-UIS baseline (any forgetting) | its UIS | reduction | best-forgetting baseline | its \\|ΔMIA\\| | its UIS | reduction | "
             "MIA ours (n=8) | MIA retrain (n=8) | MIA independent retrain (n=8) | MIA original (n=8) | speed-up vs retrain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    heads = headline(res)
    for h in heads:
        lines.append(
            f"| {h['benchmark']} | {h['setting']} | {_f(h['uis'])} | {_f(h['mia_err'], 3)} | {_f(h['independent_mia_err'], 3)} | "
            f"{h['strongest'] or 'none'} | "
            f"{_f(h['strongest_uis'])} | {_f(h['reduction'], 1)}% | {h['lowest_uis_baseline'] or '–'} | {_f(h['lowest_uis'])} | "
            f"{_f(h['reduction_vs_lowest'], 1)}% | {h['closest_baseline'] or '–'} | {_f(h['closest_mia_err'], 3)} | {_f(h['closest_uis'])} | "
            f"{_f(h['reduction_vs_closest'], 1)}% | {_f(h['mia8'], 3)} | {_f(h['mia8_retrain'], 3)} | "
            f"{_f(h['mia8_independent'], 3)} | {_f(h['mia8_original'], 3)} | "
            f"{_f(h['speedup'], 1)}× |")
    readings = mia_readings(res)
    if readings:
        lines += ["", f"MIA target (within 0.03 of the gold standard on forget sets of 8), {DEFAULT_METHOD}, read three "
                      "ways: |difference of the means| over every set of 8 (the headline's MIA columns: seeds, and in "
                      "partial erasure the forgotten tasks, pooled; errors of opposite sign cancel); the mean of "
                      "each set's |ΔMIA|; and |difference of the means| over seeds, one forgotten task at a time.", "",
                  "| benchmark | setting | sets of 8 | \\|Δ\\| of means | mean per-set \\|Δ\\| | per forgotten task: \\|Δ\\| of means |",
                  "|---|---|---|---|---|---|"]
        for m in readings:
            tasks = ", ".join(f"{t} {_f(v, 3)}" for t, v in m["per_task"].items())
            lines.append(f"| {m['benchmark']} | {m['setting']} | {m['sets']} | {_f(m['of_means'], 3)} | "
                         f"{_f(m['per_set'], 3)} | {tasks} |")
    left = [f"{h['benchmark']} · {h['setting']}: {h['left_out']}" for h in heads if h["left_out"]]
    if left:
        lines += ["", "Left out of the headline, so that every method is pooled over the same forget sets: the forget "
                      "sets that not every method ran (pieces merged with other `--methods`, `--seeds` or "
                      f"`--settings`): {'; '.join(left)}. The tables below keep every run."]
    lines += ["", "## Every method (means over seeds; partial: also over the forgotten task)", ""]
    for (bench, setting, n), by_method in sorted(aggregate(res).items()):
        lines += [f"### {bench} · {setting} · {n} instance(s)", "",
                  "| method | UIS | UIS task | UIS inst | MIA | MIA retrain | MIA original | \\|ΔMIA\\| | forget gap | seconds | speed-up |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, v in sorted(by_method.items(), key=lambda kv: _rank(kv[1]["uis"])):  # a diverged run's (None) last
            lines.append(
                f"| {m} | {_f(v['uis'])} | {_f(v['uis_task'])} | {_f(v['uis_inst'])} | {_f(v['mia_auc'], 3)} | "
                f"{_f(v['mia_auc_retrain'], 3)} | {_f(v['mia_auc_original'], 3)} | {_f(v['mia_err'], 3)} | "
                f"{_f(v['forget_gap'], 3)} | {_f(v['seconds'], 2)} | {_f(v['speedup'], 1)}× |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """UIS against forgetting error per method, one panel per benchmark and setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    keys = sorted({(r["benchmark"], r["setting"]) for r in res})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.0), squeeze=False)
    methods = sorted({r["method"] for r in res})
    cmap = plt.get_cmap("tab20")
    for ax, (bench, setting) in zip(axes[0], keys):
        agg = aggregate([{**r, "n_forget": 0} for r in res if r["benchmark"] == bench and r["setting"] == setting])
        agg = agg[(bench, setting, 0)]
        for j, m in enumerate(methods):
            if m not in agg:
                continue
            v = agg[m]
            star = m == DEFAULT_METHOD
            ax.scatter(v["mia_err"], v["uis"], s=120 if star else 40, marker="*" if star else "o", color=cmap(j % 20),
                       label=m, edgecolors="black" if star else "none", zorder=3 if star else 2)
        ax.set_xlabel("|MIA AUC − retrained|  (lower: closer to retrain)")
        ax.set_ylabel("UIS %  (lower: less interference)")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(f"{bench} · {setting}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- pieces of one suite

# config entries that describe a piece rather than the suite
_PIECE_KEYS = ("seeds", "methods", "method_configs", "prepare_seconds", "original_seconds", "workers", "settings",
               "pieces", "models_trained_on")
RUN_KEY = ("benchmark", "setting", "forget_tasks", "n_forget", "seed", "method")
DEFAULT_CACHE_DIR = ".cache/bench"


#: a run's figures: a number, or null where the figure is undefined (a diverged run's MIA AUC)
RUN_FIGURES = ("uis", "uis_task", "uis_inst", "mia_auc", "mia_auc_original", "mia_auc_retrain", "forget_gap",
               "seconds", "retrain_seconds")


def _row_problem(r) -> str | None:
    """What makes ``r`` no run of this module's (the summary would fail on it after the
    merged JSON was written), or None."""
    if not isinstance(r, dict):
        return f"a {type(r).__name__}, not an object"
    missing = [k for k in (*RUN_KEY, *RUN_FIGURES) if k not in r]
    if missing:
        return f"no {missing}"
    if not (isinstance(r["forget_tasks"], list) and all(isinstance(t, str) for t in r["forget_tasks"])):
        return f"forget_tasks {r['forget_tasks']!r} is not a list of task names"
    for k in ("benchmark", "setting", "method"):
        if not isinstance(r[k], str):
            return f"{k} {r[k]!r} is not a string"
    for k in ("n_forget", "seed"):
        if not isinstance(r[k], int) or isinstance(r[k], bool):
            return f"{k} {r[k]!r} is not an integer"
    for k in RUN_FIGURES:
        if r[k] is not None and (not isinstance(r[k], (int, float)) or isinstance(r[k], bool)):
            return f"{k} {r[k]!r} is not a number"
    return None


def merge(docs: list[dict], sources: list[str]) -> dict:
    """One results document from the documents of pieces of one suite run.

    The pieces must be of the same suite, with the same suite definition, torch
    version, device and hyper-parameters of every method they share (a table that
    mixed them would compare runs that are not comparable), and no run (benchmark,
    setting, forget tasks, size, seed, method) may appear twice. Each piece's
    command, wall time, seeds, methods and per-benchmark ``prepare_seconds`` /
    ``original_seconds`` are kept under ``config.pieces``; the top-level ones are the
    first piece's per benchmark (a later piece found the original in the cache). A
    document that is itself a merge contributes its pieces, so a table can grow as
    pieces arrive."""
    if not docs:
        raise ValueError("merge: no results documents given")
    first, name0 = docs[0], sources[0]
    shared = {k: v for k, v in first["config"].items() if k not in _PIECE_KEYS}
    configs: dict[str, tuple[str, dict]] = {}
    seen: dict[tuple, str] = {}
    results, pieces = [], []
    for doc, name in zip(docs, sources):
        missing = [k for k in ("suite", "device", "config", "results") if k not in doc]
        if missing:
            raise ValueError(f"merge: {name} is not a results document of unlearning.bench (no {missing})")
        for key in ("suite", "device"):
            if doc[key] != first[key]:
                raise ValueError(f"merge: {name} has {key} {doc[key]!r}, {name0} has {first[key]!r}; "
                                 f"pieces of one table must share it (run the piece again)")
        mine = {k: v for k, v in doc["config"].items() if k not in _PIECE_KEYS}
        if mine != shared:
            diff = sorted(k for k in set(mine) | set(shared) if mine.get(k) != shared.get(k))
            raise ValueError(f"merge: {name} and {name0} differ in the suite's configuration: {diff}")
        # every method the piece ran, with its overrides ({} = its DEFAULTS: a piece records none then)
        overrides = doc["config"].get("method_configs") or {}
        ran = dict.fromkeys([*(doc["config"].get("methods") or []), *(r["method"] for r in doc["results"])])
        for method in ran:
            cfg = overrides.get(method, {})
            if method in configs and configs[method][1] != cfg:
                raise ValueError(f"merge: {name} and {configs[method][0]} ran {method} with other hyper-parameters")
            configs.setdefault(method, (name, cfg))
        if not isinstance(doc["results"], list):
            raise ValueError(f"merge: {name}'s results are not a list of runs")
        for i, r in enumerate(doc["results"]):
            problem = _row_problem(r)
            if problem:
                raise ValueError(f"merge: run {i} of {name} is not a run of unlearning.bench: {problem}")
            key = tuple(tuple(r[k]) if isinstance(r[k], list) else r[k] for k in RUN_KEY)
            if key in seen:
                raise ValueError(f"merge: the run {dict(zip(RUN_KEY, key))} is in {seen[key]} and in {name}")
            seen[key] = name
            results.append(r)
        if doc["config"].get("pieces"):  # an earlier merge: its pieces, so results can be pooled as they arrive
            pieces += doc["config"]["pieces"]
        else:
            pieces.append({"source": name, "command": doc.get("command"), "wall_seconds": doc.get("wall_seconds"),
                           **{k: doc["config"].get(k) for k in _PIECE_KEYS if k != "pieces"},
                           # a run cut off (its rows are whole runs; settings without rows did not run)
                           **({"incomplete": True} if doc.get("incomplete") else {})})
    config = {**shared,
              "seeds": sorted({r["seed"] for r in results}),
              "methods": list(dict.fromkeys(m for p in pieces for m in (p["methods"] or []))),
              "method_configs": {m: c for m, (_, c) in configs.items() if c},
              "prepare_seconds": {}, "original_seconds": {}, "pieces": pieces}
    trained_on: dict[str, int] = {}
    for piece in pieces:
        for k in ("prepare_seconds", "original_seconds"):
            for bench_name, value in (piece[k] or {}).items():
                config[k].setdefault(bench_name, value)
        for where, n in (piece.get("models_trained_on") or {}).items():
            trained_on[where] = trained_on.get(where, 0) + n
    if trained_on:
        config["models_trained_on"] = trained_on
    walls = [p["wall_seconds"] for p in pieces]
    return {"suite": first["suite"], "config": config, "device": first["device"], "results": results,
            "wall_seconds": round(sum(walls), 1) if all(w is not None for w in walls) else None}


def write_results(doc: dict, out: Path) -> None:
    """The JSON document, its markdown summary and its plot next to ``out``."""
    summary = markdown(doc)  # before anything is written: a summary that fails leaves the old files as they were
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(summary)
    plot(doc, out.with_suffix(".png"))


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None, prog: str = "python -m unlearning.bench") -> int:
    """Run a benchmark suite and write JSON, markdown and PNG results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    p.add_argument("--suite", choices=sorted(SUITES), default=None, help="default: smoke")
    p.add_argument("--out", required=True, help="results JSON path (.md and .png are written next to it)")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: all ({', '.join(METHOD_NAMES)})")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="training and method seeds (default: the suite's: "
                   + "; ".join(f"{n} {' '.join(map(str, s['seeds']))}" for n, s in SUITES.items()) + ")")
    p.add_argument("--benchmarks", nargs="+", default=None, help="default: all of the suite's")
    p.add_argument("--cache-dir", default=None,
                   help=f"trained originals and gold standards, keyed by config (default: {DEFAULT_CACHE_DIR})")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: the suite's)")
    p.add_argument("--method-config", default=None, help="JSON file {method: {hyper-parameter: value}} "
                   "(default: each method's own defaults)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-independent-retrain", action="store_true",
                   help=f"skip the {INDEPENDENT_RETRAIN} reference (a second gold standard with another seed)")
    p.add_argument("--no-shadow", action="store_true",
                   help="do not give interference_aware the training recipe (no shadow calibration of its tau)")
    p.add_argument("--workers", type=int, default=0,
                   help="train the gold standards ahead in this many extra processes (default 0: in this one); "
                        "on CPU each takes one core at the suite's thread count")
    p.add_argument("--settings", nargs="+", default=None, metavar="SETTING",
                   help="run only these settings: full:<n_forget> or partial:<task> (e.g. full:8 partial:depth); "
                        "default: all of the suite's")
    p.add_argument("--reference-scenes", type=int, default=0, metavar="N",
                   help="give the methods N held-out scenes of their own (interference_aware's tau and its "
                        "calibration), not the test scenes the membership attack scores against (default 0: "
                        "the test scenes serve both)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: pool the results of these pieces of one suite "
                        "(see --benchmarks, --seeds, --settings, --methods)")
    args = p.parse_args(argv)
    command = f"{prog} " + " ".join(shlex.quote(a) for a in argv)  # as it was run (unlearnd bench ...)
    # A refused request: `error: <what is wrong>` on stderr and exit status 2 (a SystemExit, as
    # argparse's own errors), before anything is written.
    try:
        _check_options(args)
        doc = _merge_pieces(args) if args.merge else _run(args, command)
    except CliError as exc:
        raise SystemExit(report_cli_error(exc)) from None
    except KeyboardInterrupt:  # Ctrl-C: one line saying what is kept, not a traceback
        out = Path(args.out)
        kept = _is_incomplete(out) and not args.merge
        print(f"interrupted: {out} keeps the settings that finished, marked \"incomplete\": true (pool it with "
              "the rest through --merge once they have run)" if kept else "interrupted: nothing was written",
              file=sys.stderr)
        return INTERRUPTED
    doc["command"] = command
    write_results(doc, Path(args.out))
    print(markdown(doc))
    return 0


def _is_incomplete(out: Path) -> bool:
    """Whether ``out`` holds a cut-off run's checkpoint (``"incomplete": true``)."""
    try:
        return json.loads(out.read_text()).get("incomplete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _check_options(args) -> None:
    """:class:`CliError` for options that do not go together: ``--merge`` with an option of a
    run (it runs nothing, and pools the pieces of whichever suite they are), a negative
    ``--workers``, a seed or method named twice (each would run twice, and the document
    would hold the same run twice: averaged in twice, and refused by ``--merge``)."""
    if args.workers < 0:
        raise CliError(f"--workers must be 0 or more, got {args.workers}")
    if args.reference_scenes < 0:
        raise CliError(f"--reference-scenes must be 0 or more, got {args.reference_scenes}")
    if args.merge:
        run_options = {"--suite": args.suite, "--methods": args.methods, "--seeds": args.seeds,
                       "--benchmarks": args.benchmarks, "--method-config": args.method_config,
                       "--device": args.device, "--no-shadow": args.no_shadow,
                       "--no-independent-retrain": args.no_independent_retrain, "--workers": args.workers,
                       "--settings": args.settings, "--reference-scenes": args.reference_scenes,
                       "--cache-dir": args.cache_dir}
        given = [flag for flag, value in run_options.items() if value not in (None, False, 0)]
        if given:
            raise CliError(f"--merge runs nothing; it does not take {', '.join(given)}")
    for flag, values in (("--seeds", args.seeds), ("--methods", args.methods)):
        twice = [v for i, v in enumerate(values or []) if v in (values or [])[:i]]
        if twice:
            raise CliError(f"{flag}: {', '.join(map(repr, dict.fromkeys(twice)))} given twice (each would run twice)")
    for seed in args.seeds or []:  # each seeds the methods' generators (x 1_000_003) and the forget sets
        check_seed(seed, "--seeds", METHOD_SEEDS)


def _results_path(text: str) -> Path:
    """``--out``: a file path (the .md and .png go next to it) whose folder can be made. Its
    suffix is not theirs: ``--out r.md`` would have the summary written over the results
    (and, in a run, every checkpoint of them deleted as a stale summary)."""
    out = Path(text)
    if not out.name or out.name == "..":  # `.`, `/`, `` (the current folder), `..`: no file name
        raise CliError(f"--out {text!r} is a directory, not a file name; --out is the results JSON file, "
                       "e.g. results.json")
    if out.suffix.lower() in (".md", ".png"):
        raise CliError(f"--out {out}: the summary and the plot are written next to the results JSON as "
                       f"{out.with_suffix('.md').name} and {out.with_suffix('.png').name}, over the JSON; "
                       f"--out is the JSON file, e.g. {out.with_suffix('.json')}")
    # first: a name too long for the file system would fail the is_dir calls below
    check_creatable(out, siblings=[_aside(out).name, out.with_suffix(".md").name, out.with_suffix(".png").name])
    for path in (out, out.with_suffix(".md"), out.with_suffix(".png")):
        if path.is_dir():
            raise CliError(f"--out {out}: {path} is a directory; --out is the results JSON file")
    return out


def _aside(out: Path) -> Path:
    """Where a run's JSON is written before it is renamed to ``out``."""
    return out.with_name(out.name + ".partial")


def _merge_pieces(args) -> dict:
    """``--merge``: the pieces read and pooled (:func:`merge`), every problem a :class:`CliError`."""
    out = _results_path(args.out)
    docs = []
    for name in args.merge:
        doc = read_json(name, "--merge")
        if not isinstance(doc, dict):
            raise CliError(f"--merge {name} is not a results document of unlearning.bench "
                           f"(it holds {json_type(doc)}, not an object)")
        docs.append(doc)
    try:
        doc = merge(docs, list(args.merge))
    except ValueError as exc:  # the pieces do not belong to one table (the message names the piece)
        raise CliError(str(exc)) from None
    except (KeyError, TypeError, AttributeError) as exc:  # a field of the wrong shape
        raise CliError(f"--merge: {', '.join(args.merge)}: a piece is not a well-formed results document of "
                       f"unlearning.bench ({type(exc).__name__}: {exc})") from None
    if not doc["results"]:
        raise CliError(f"--merge: the pieces hold no results; nothing is written to {out}")
    return doc


def _method_configs(path: str | None) -> dict:
    """``--method-config``: a JSON object {method: {hyper-parameter: value}} of known methods
    and parameters (checked as the service's jobs check theirs)."""
    if path is None:
        return {}
    from .job import check_config

    configs = read_json(path, "--method-config")
    if not isinstance(configs, dict):
        raise CliError(f"--method-config {path} must hold a JSON object {{method: {{hyper-parameter: value}}}}, "
                       f"not {json_type(configs)}")
    for method, config in configs.items():
        if method not in METHOD_NAMES:
            raise CliError(f"--method-config {path}: unknown method {method!r}; methods: {', '.join(METHOD_NAMES)}")
        if not isinstance(config, dict):
            raise CliError(f"--method-config {path}: {method!r} must map to a JSON object of hyper-parameters, "
                           f"not {json_type(config)}")
        try:
            check_config(method, config)
        except ValueError as exc:
            raise CliError(f"--method-config {path}: {exc}") from None
    return configs


def _run(args, command: str) -> dict:
    """Run the suite of the command line, its options checked first; returns the results document."""
    args.suite = args.suite or "smoke"
    suite = SUITES[args.suite]
    methods = args.methods or list(METHOD_NAMES)
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise CliError(f"--methods: unknown method{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                       f"methods: {', '.join(METHOD_NAMES)}")
    for m in methods:
        get_method(m)
    if args.benchmarks is not None:
        unknown = [b for b in args.benchmarks if b not in suite["benchmarks"]]
        if unknown:
            raise CliError(f"--benchmarks: suite {args.suite!r} has no benchmark {', '.join(map(repr, unknown))}; "
                           f"its benchmarks: {', '.join(suite['benchmarks'])}")
    configs = _method_configs(args.method_config)
    cli_device(args.device or suite["device"], "--device" if args.device else f"the {args.suite} suite's device")
    out = _results_path(args.out)
    names = [b for b in suite["benchmarks"] if args.benchmarks is None or b in args.benchmarks]
    if args.settings is not None:  # before the cache folder is made
        try:
            names = benchmarks_with_settings(args.suite, names, args.settings)
        except UnknownSettings as exc:
            raise CliError(str(exc)) from None
    if args.reference_scenes:  # the suites' own sizes fit; the reference scenes are the caller's
        from .resources import memory_shortfall, reference_bytes

        # only the benchmarks with a setting to run render theirs
        problem = memory_shortfall({f"{b}'s {args.reference_scenes} reference scenes":
                                    reference_bytes(suite["benchmarks"][b], args.reference_scenes) for b in names})
        if problem:
            raise CliError(f"--reference-scenes {args.reference_scenes}: this run {problem}")
    cache_dir = Path(args.cache_dir or DEFAULT_CACHE_DIR) / args.suite
    check_creatable(cache_dir, "--cache-dir")
    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def checkpoint(partial: dict) -> None:
        # the JSON alone, marked, after every setting: a run cut off keeps what it finished.
        # Written aside and renamed (a kill mid-write leaves the last whole one); the .md and
        # .png of an earlier run at this path go, so none sits beside it as if it were its own.
        partial = {**partial, "command": command, "incomplete": True,
                   "wall_seconds": round(time.perf_counter() - start, 1)}
        out.parent.mkdir(parents=True, exist_ok=True)
        aside = _aside(out)
        aside.write_text(json.dumps(partial, indent=1) + "\n")
        os.replace(aside, out)
        for stale in (out.with_suffix(".md"), out.with_suffix(".png")):
            stale.unlink(missing_ok=True)

    try:
        doc = run_suite(args.suite, methods, args.seeds, cache_dir, args.device, args.benchmarks, configs,
                        not args.no_progress, shadow=not args.no_shadow,
                        independent_retrain=not args.no_independent_retrain, workers=args.workers,
                        only_settings=args.settings, on_update=checkpoint, reference_scenes=args.reference_scenes)
    except UnknownSettings as exc:
        raise CliError(str(exc)) from None
    if not doc["results"]:
        raise CliError(f"the options select no run of suite {args.suite!r}; nothing is written to {out}")
    doc["wall_seconds"] = round(time.perf_counter() - start, 1)
    return doc


if __name__ == "__main__":
    sys.exit(main())
