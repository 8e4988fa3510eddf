"""How often interference_aware's one-projection orthogonalization leaves a conflict.

Step 4 of the method (design §2) removes from the forget step, per parameter tensor, its
component in the span of the retain references' gradients it conflicts with (negative
inner product). A reference it did *not* conflict with can conflict with the projected
step when the references are correlated. This script runs the default job on every
forget set of 8 of the given seeds, as the bench runs it (shadow-calibrated unless
``--no-shadow``), and counts per job the projections (calls that removed at least one
conflict), those after which another reference conflicts, and the worst cosine between
the projected step and such a reference.

    python benchmarks/orthogonalization_conflicts.py --benchmarks indoor street --seeds 2 \\
        --out benchmarks/tune_round6/conflicts.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from job_ledger import job_arguments, job_config, prepared_cache, version_state
from unlearning.bench import SUITES, _device_name, settings, suite_runtime
from unlearning.methods import UnlearnData, get_method, interference_aware


class ConflictCounter:
    """Wraps ``interference_aware._orthogonalize`` inside the block and counts what its
    result leaves: a projection with a reference that conflicts afterwards."""

    def __init__(self):
        self.counts = {"calls": 0, "projections": 0, "left_a_conflict": 0, "worst_cosine": 0.0}
        self._real = None

    def __enter__(self):
        real = self._real = interference_aware._orthogonalize

        def counted(g, refs, iterate=False):
            out, removed = real(g, refs, iterate)
            self.counts["calls"] += 1
            if removed:
                self.counts["projections"] += 1
                cos = [float((out * r).sum()) / (float(out.norm() * r.norm()) + 1e-30) for r in refs if r is not None]
                if min(cos) < -1e-6:
                    self.counts["left_a_conflict"] += 1
                    self.counts["worst_cosine"] = round(min(self.counts["worst_cosine"], min(cos)), 4)
            return out, removed

        interference_aware._orthogonalize = counted
        return self

    def __exit__(self, *exc):
        interference_aware._orthogonalize = self._real


def main(argv: list[str] | None = None) -> int:
    args = job_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), seeds=[2]).parse_args(argv)
    suite = SUITES[args.suite]
    device, recipe = suite_runtime(suite, "cpu")
    cfg = job_config(args, recipe)
    rows = []
    for bench in args.benchmarks:
        train, test, original, _ = version_state(suite, bench, None, Path(args.cache_dir) / args.suite, recipe, device)
        cache = prepared_cache(original, train, test, cfg)
        for st in settings(train, suite, args.seeds):
            if st["n_forget"] != 8:
                continue
            data = UnlearnData(train, st["cells"], train.without(st["cells"]), heldout=test, device=device,
                               seed=int(st["seed"]), cache=cache)
            with ConflictCounter() as counter:
                get_method("interference_aware")(original, data, cfg)
            c = counter.counts
            rows.append({"benchmark": bench, "setting": st["setting"], "forget_tasks": st["forget_tasks"],
                         "seed": st["seed"], **c, "share": round(c["left_a_conflict"] / max(c["projections"], 1), 4)})
            print(f"{bench} {st['setting']:7s} {'/'.join(st['forget_tasks']):30s} seed {st['seed']}: "
                  f"{c['left_a_conflict']} of {c['projections']} projections left a conflict "
                  f"({rows[-1]['share']:.1%}; worst cosine {c['worst_cosine']})", flush=True)
    doc = {"suite": args.suite, "config": cfg, "device": _device_name(device),
           "command": "python benchmarks/orthogonalization_conflicts.py "
                      + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
