"""What an interference_aware job computes, counted in per-sample forward passes, against
a retrain: the hardware-independent side of the speed-up.

Every forward pass of the model in a job is counted, per sample, by where it happens:
training passes (gradient on: the forget batch and the retain references, each followed
by a backward pass), the τ refreshes (the current model on held-out data, no gradient),
the other gradient-free passes (the distillation teacher's outputs on the retain
references) and the job's evaluation (UIS, MIA AUC; what is cached per model version is
not counted, as in the bench). A backward pass is taken to cost two forward passes, so a
job's compute is ``3 × training + the rest`` forward-pass equivalents, and a retrain's
``3 × epochs × retained instances``. Where compute is proportional to the samples'
pixels (large images, a saturated accelerator), the ratio of the two is the speed-up;
on small images and CPU, fixed per-step costs lower it.

``--n-test`` renders a held-out set of another size (the ``full`` suite has 654 indoor
test scenes against smoke's 48) to count what the refreshes and the evaluation cost
there; the training set, hence the original model, is the same.

    python benchmarks/job_ledger.py --suite smoke --benchmark indoor --seeds 4 --n-test 48 654 \\
        --variants '{"default": {}, "refresh all held-out": {"tau_refresh_sample": null}}' \\
        --out benchmarks/refresh_subset/ledger.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from unlearning.bench import SUITES, _device_name, cached_original, settings, suite_runtime
from unlearning.data import load_splits
from unlearning.evaluate import EvalContext, evaluate_unlearning
from unlearning.methods import UnlearnData, get_method, interference_aware
from unlearning.model import MultiTaskNet


class Ledger:
    """Counts per-sample forward passes of every :class:`MultiTaskNet`, by phase.

    Inside the block, a pass with gradient in phase ``"job"`` counts as ``job_training``;
    interference_aware's τ refreshes (its calls of ``per_sample_losses`` while a job runs:
    the only uncached ones) as ``job_tau_refresh``; any other pass as its phase."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.phase = "other"
        self._handle = None
        self._real = None

    def __enter__(self):
        def hook(module, inputs, _output):
            if isinstance(module, MultiTaskNet):
                grad = torch.is_grad_enabled() and self.phase == "job"
                self.counts["job_training" if grad else self.phase] += int(inputs[0].shape[0])

        real = self._real = interference_aware.per_sample_losses

        def refresh_spy(*a, **kw):
            before = self.phase
            if before == "job":
                self.phase = "job_tau_refresh"
            try:
                return real(*a, **kw)
            finally:
                self.phase = before

        interference_aware.per_sample_losses = refresh_spy
        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        interference_aware.per_sample_losses = self._real

    def forward_equivalents(self) -> int:
        """:func:`forward_equivalents` of the counts so far."""
        return forward_equivalents(self.counts)


def forward_equivalents(counts: dict) -> int:
    """``3 × training + the rest`` of a job's per-sample forward counts (phase ``other``
    excluded): a backward pass is taken to cost two forward passes."""
    return (3 * counts.get("job_training", 0) + counts.get("job", 0) + counts.get("job_tau_refresh", 0)
            + counts.get("evaluation", 0))


def version_state(suite: dict, bench: str, n_test: int | None, cache_dir: Path, recipe, device):
    """What a benchmark's model version gives every job: ``(train, test, original,
    context)`` with ``n_test`` held-out scenes (None: the suite's), the original model
    (trained if not cached; keyed by the suite's own spec, since the training split does
    not depend on ``n_test``) and its :class:`EvalContext`, filled as the bench fills it
    before any timed job."""
    base = suite["benchmarks"][bench]
    train, test = load_splits(base if n_test is None else {**base, "n_test": n_test})
    original, _ = cached_original(cache_dir, train, base, recipe, device)
    context = EvalContext(original, train, test, retained_sample_size=suite["retained_sample_size"],
                          device=device).warm()
    return train, test, original, context


def prepared_cache(original, train, test, cfg: dict) -> dict:
    """interference_aware's per-version state for ``cfg`` (held-out losses, refresh subset,
    shadows, features), computed before any job as the bench does."""
    cache: dict = {}
    interference_aware.prepare(original, UnlearnData(train, [train.cells()[0]], train, heldout=test, cache=cache), cfg)
    return cache


def job_arguments(p: argparse.ArgumentParser, seeds: list[int]) -> argparse.ArgumentParser:
    """The arguments of the scripts that run interference_aware jobs of a suite as the
    bench does (step_budget.py, orthogonalization_conflicts.py)."""
    p.add_argument("--suite", default="smoke", choices=sorted(SUITES))
    p.add_argument("--benchmarks", nargs="+", default=["indoor"])
    p.add_argument("--seeds", nargs="+", type=int, default=seeds)
    p.add_argument("--config", default="{}", help="JSON interference_aware config (over its DEFAULTS)")
    p.add_argument("--no-shadow", action="store_true", help="as the service runs the method: no shadow calibration")
    p.add_argument("--cache-dir", default=".cache/bench", help="the bench cache (models are trained if absent)")
    p.add_argument("--out", required=True)
    return p


def job_config(args: argparse.Namespace, recipe) -> dict:
    """``--config`` with the suite's recipe as ``shadow_recipe`` unless ``--no-shadow``, as
    the bench runs the method."""
    cfg = json.loads(args.config)
    return cfg if args.no_shadow else {"shadow_recipe": asdict(recipe), **cfg}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="smoke", choices=sorted(SUITES))
    p.add_argument("--benchmark", default="indoor")
    p.add_argument("--seeds", nargs="+", type=int, default=[4])
    p.add_argument("--n-test", nargs="+", type=int, default=None, help="held-out set sizes (default: the suite's)")
    p.add_argument("--variants", default='{"default": {}}', help="JSON {name: interference_aware config}")
    p.add_argument("--cache-dir", default=".cache/bench", help="the bench cache (the original model is trained if absent)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    suite = SUITES[args.suite]
    device, recipe = suite_runtime(suite, "cpu")
    variants = json.loads(args.variants)
    rows = []
    for n_test in args.n_test or [suite["benchmarks"][args.benchmark]["n_test"]]:
        train, test, original, context = version_state(suite, args.benchmark, n_test, Path(args.cache_dir) / args.suite,
                                                       recipe, device)
        for name, cfg in variants.items():
            cache = prepared_cache(original, train, test, cfg)
            for st in settings(train, suite, args.seeds):
                if st["n_forget"] != 8:
                    continue
                retain = train.without(st["cells"])
                data = UnlearnData(train, st["cells"], retain, heldout=test, device=device, seed=int(st["seed"]), cache=cache)
                with Ledger() as ledger:
                    ledger.phase = "job"
                    t0 = time.perf_counter()
                    unlearned, log = get_method("interference_aware")(original, data, cfg)
                    ledger.phase = "evaluation"
                    evaluate_unlearning(original, unlearned, train, st["cells"], test, context=context.per_version(),
                                        device=device)
                    t2 = time.perf_counter()
                c = ledger.counts
                job_eq = ledger.forward_equivalents()
                retrain_eq = 3 * recipe.epochs * len(retain)
                row = {"variant": name, "config": cfg, "n_test": n_test, "setting": st["setting"],
                       "forget_tasks": st["forget_tasks"], "seed": st["seed"], "steps": log["steps"],
                       "tau_refreshes": len(log.get("tau_history", [])),
                       "forward_samples": {"training (+ backward)": c["job_training"], "tau refresh": c["job_tau_refresh"],
                                           "teacher and other gradient-free": c["job"], "evaluation": c["evaluation"]},
                       "job_forward_equivalents": job_eq,
                       "retrain_forward_equivalents": retrain_eq,
                       "compute_ratio": round(retrain_eq / job_eq, 2),
                       "refresh_share": round(c["job_tau_refresh"] / job_eq, 3),
                       "job_seconds_here": round(t2 - t0, 2)}
                rows.append(row)
                print(f"{name:24s} n_test {n_test:4d} {st['setting']:7s} {'/'.join(st['forget_tasks']):30s} "
                      f"{job_eq:7d} fwd-eq (refresh {row['refresh_share']:.0%}), retrain {retrain_eq}, "
                      f"ratio {row['compute_ratio']:.1f}", flush=True)
    doc = {"suite": args.suite, "benchmark": args.benchmark, "seeds": args.seeds, "device": _device_name(device),
           "recipe": asdict(recipe),
           "command": "python benchmarks/job_ledger.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
           "rows": rows}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
