"""How much do disjoint held-out sets of the test split's size differ under the original model?

interference_aware places forgotten cells at quantiles of held-out losses; the membership
attack ranks them among the test split's. This script renders consecutive blocks of test
scenes (block 0 is the test split itself, block 1 the reference of ``--reference-scenes``
at the same size, ...) and reports the original model's median per-sample loss per task
on each, so the spread between blocks can be read against the MIA errors:

    python benchmarks/heldout_medians.py --suite smoke --blocks 5 --cache-dir .cache/bench \\
        --out benchmarks/reference_split/heldout_medians.json

The original model comes from the bench cache (trained there when missing, as the bench
would).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from unlearning import bench
from unlearning.data import load_splits
from unlearning.data.synthetic import load_synthetic
from unlearning.methods.interference_aware import per_sample_losses


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="smoke", choices=sorted(bench.SUITES))
    p.add_argument("--benchmarks", nargs="+", default=None)
    p.add_argument("--blocks", type=int, default=5, help="blocks of n_test scenes, the test split first")
    p.add_argument("--cache-dir", default=".cache/bench", help="the bench's --cache-dir (the suite's folder inside)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.blocks < 1:
        raise SystemExit(f"--blocks must be at least 1, got {args.blocks}")
    suite = bench.SUITES[args.suite]
    device, recipe = bench.suite_runtime(suite, None)
    out = {"command": "python benchmarks/heldout_medians.py " + " ".join(shlex.quote(a) for a in argv),
           "device": bench._device_name(device), "benchmarks": {}}
    for name in args.benchmarks or list(suite["benchmarks"]):
        spec = suite["benchmarks"][name]
        train, _ = load_splits(spec, render_workers="auto")
        original, _ = bench.cached_original(Path(args.cache_dir) / args.suite, train, spec, recipe, device)
        n = int(spec["n_test"])
        rows = []
        for block in range(args.blocks):
            scenes = range(block * n, (block + 1) * n)
            _, held = load_synthetic({**spec, "n_train": 0}, render_workers="auto", test_scenes=scenes)
            losses = per_sample_losses(original, held, device=device)
            rows.append({"scenes": [scenes.start, scenes.stop - 1],
                         "median_loss": {t: round(float(v.nanmedian()), 4) for t, v in losses.items()}})
            print(name, rows[-1], flush=True)
        out["benchmarks"][name] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
