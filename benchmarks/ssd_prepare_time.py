"""How long ssd's per-version state (``I_d``, :func:`unlearning.methods.ssd.prepare`) takes
against the rest of an ``ssd`` call, on a suite's original models (trained if not cached).

    python benchmarks/ssd_prepare_time.py --suite smoke --out benchmarks/ssd_prepare_time.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from job_ledger import version_state
from unlearning.bench import SUITES, _device_name, suite_runtime
from unlearning.methods import UnlearnData, get_method, prepare_method


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="smoke", choices=sorted(SUITES))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache-dir", default=".cache/bench")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    suite = SUITES[args.suite]
    device, recipe = suite_runtime(suite)
    rows = []
    for bench in suite["benchmarks"]:
        train, test, original, _ = version_state(suite, bench, None, Path(args.cache_dir) / args.suite, recipe, device)
        cells = [(i, t) for i in train.instance_ids[:8] for t in train.tasks]  # a full request of 8
        for _ in range(args.repeats):
            data = UnlearnData(train, cells, train.without(cells), heldout=test, device=device, seed=0, cache={})
            t0 = time.perf_counter()
            prepare_method("ssd", original, data, {})
            t1 = time.perf_counter()
            get_method("ssd")(original, data, {})
            t2 = time.perf_counter()
            rows.append({"benchmark": bench, "prepare_seconds": round(t1 - t0, 3), "unlearn_seconds": round(t2 - t1, 3)})
            print(rows[-1], flush=True)
    doc = {"suite": args.suite, "device": _device_name(device), "rows": rows,
           "command": "python benchmarks/ssd_prepare_time.py " + " ".join(shlex.quote(a) for a in argv)}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
