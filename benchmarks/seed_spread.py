"""How far a method's membership-inference AUC is from the gold standard's, with the
spread over seeds: per benchmark and setting (forget sets of 8; in partial mode
every forgotten task pooled), the mean of ``d = mia_auc - mia_auc_retrain`` over
runs, its standard error, and the mean ``|d|``. ``|mean d|`` is the quantity
issue 2's 0.03 target names (AUCs averaged over seeds); the independent retrain's
row is how far a second gold standard lands by chance.

    python benchmarks/seed_spread.py benchmarks/mia_seeds/smoke_8seeds.json [MORE.json ...] [--seeds 0 1] [--json OUT]

Several results files are pooled (their runs must be distinct forget sets).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

METHODS = ("interference_aware", "retrain_independent")


def mean_se(d: list[float]) -> tuple[float, float | None]:
    """The mean of ``d`` and its standard error (None for a single value)."""
    n = len(d)
    mean = sum(d) / n
    return mean, (math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else None)


def spread(results: list[dict], seeds: list[int] | None = None, n_forget: int = 8) -> list[dict]:
    groups: dict = {}
    for r in results:
        if r["n_forget"] != n_forget or r["method"] not in METHODS or (seeds and r["seed"] not in seeds):
            continue
        if r["mia_auc"] is None or r["mia_auc_retrain"] is None:
            continue
        groups.setdefault((r["benchmark"], r["setting"], r["method"]), []).append(r["mia_auc"] - r["mia_auc_retrain"])
    rows = []
    for (bench, setting, method), d in sorted(groups.items()):
        mean, se = mean_se(d)
        rows.append({"benchmark": bench, "setting": setting, "method": method, "runs": len(d),
                     "mean_d": round(mean, 4), "se_d": None if se is None else round(se, 4),
                     "abs_mean_d": round(abs(mean), 4), "mean_abs_d": round(sum(abs(x) for x in d) / len(d), 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results JSON(s) of python -m unlearning.bench, pooled")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds (default: all)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    docs = [json.loads(Path(f).read_text()) for f in args.results]
    rows = spread([r for doc in docs for r in doc["results"]], args.seeds)
    print("| benchmark | setting | method | runs | mean d | SE | \\|mean d\\| | mean \\|d\\| |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['setting']} | {r['method']} | {r['runs']} | {r['mean_d']:+.3f} | {'-' if r['se_d'] is None else format(r['se_d'], '.3f')} "
              f"| {r['abs_mean_d']:.3f} | {r['mean_abs_d']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"source": args.results if len(args.results) > 1 else args.results[0], "seeds": args.seeds,
                                               "device": sorted({str(doc.get("device")) for doc in docs}),
                                               "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
