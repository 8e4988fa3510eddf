"""Does interference_aware's MIA result rest on taking τ from the attack's own non-members?

By default the method's held-out data (its reference levels τ, their refreshes, the
shadow calibration) is the test split, which is also where the membership attack takes
its non-members. ``unlearning.bench --reference-scenes N`` gives the method N other
held-out scenes; the test split, the original models and the gold standards stay the
same. This script pairs two bench documents of the same runs, one without and one with
the option, forget set by forget set (forget sets of 8 only: for one instance the AUC is
a rank):

    python benchmarks/reference_split.py benchmarks/reference_split/default.json \\
        benchmarks/reference_split/reference48.json --out benchmarks/reference_split/summary.json

Per benchmark and setting (partial: every task's sets pooled): ``d`` = MIA AUC − the gold
standard's, its mean ± standard error over the sets, |mean d| (the issue's target is on
it, ≤ 0.03), mean |d|, mean UIS, and the paired change (own reference − test split) of
the AUC and of UIS, mean ± standard error.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from statistics import mean, stdev

METHOD = "interference_aware"


def _key(run: dict) -> tuple:
    return (run["benchmark"], run["setting"], "/".join(run["forget_tasks"]), run["n_forget"], run["seed"])


def _runs(doc: dict) -> dict[tuple, dict]:
    return {_key(r): r for r in doc["results"] if r["method"] == METHOD and r["n_forget"] == 8}


def _se(xs: list[float]) -> float:
    return stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def _spread(xs: list[float]) -> dict:
    return {"mean": round(mean(xs), 4), "se": round(_se(xs), 4)}


def compare(base: dict, other: dict) -> dict:
    """``{"benchmark/setting": summary}`` over the forget sets both documents ran."""
    a, b = _runs(base), _runs(other)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise SystemExit("the two documents share no interference_aware run on a forget set of 8")
    for k in shared:  # the same attack data and gold standard, or the pairing means nothing
        if (a[k]["mia_auc_retrain"], a[k]["mia_auc_original"]) != (b[k]["mia_auc_retrain"], b[k]["mia_auc_original"]):
            raise SystemExit(f"run {k}: the gold standard's or the original's AUC differs between the documents "
                             "(other models or another test split): not a paired comparison")
    out: dict[str, dict] = {}
    for group in sorted({k[:2] for k in shared}):
        keys = [k for k in shared if k[:2] == group]
        summary = {"sets": len(keys)}
        for name, runs in (("test_split", a), ("own_reference", b)):
            d = [runs[k]["mia_auc"] - runs[k]["mia_auc_retrain"] for k in keys]
            summary[name] = {"d": _spread(d), "abs_mean_d": round(abs(mean(d)), 4),
                             "mean_abs_d": round(mean(abs(x) for x in d), 4),
                             "uis": round(mean(runs[k]["uis"] for k in keys), 4),
                             "mia_auc": round(mean(runs[k]["mia_auc"] for k in keys), 4)}
        summary["mia_retrain"] = round(mean(a[k]["mia_auc_retrain"] for k in keys), 4)
        summary["change_mia_auc"] = _spread([b[k]["mia_auc"] - a[k]["mia_auc"] for k in keys])
        summary["change_uis"] = _spread([b[k]["uis"] - a[k]["uis"] for k in keys])
        out["/".join(group)] = summary
    return out


def markdown(summary: dict) -> str:
    lines = ["| benchmark · setting | sets | mean d, test split | mean d, own reference | mean \\|d\\| test / own | "
             "UIS test / own | AUC change (own − test) | UIS change |",
             "|---|---|---|---|---|---|---|---|"]
    for group, s in summary.items():
        t, o = s["test_split"], s["own_reference"]
        lines.append(f"| {group.replace('/', ' · ')} | {s['sets']} | {t['d']['mean']:+.3f} ± {t['d']['se']:.3f} | "
                     f"{o['d']['mean']:+.3f} ± {o['d']['se']:.3f} | {t['mean_abs_d']:.3f} / {o['mean_abs_d']:.3f} | "
                     f"{t['uis']:.3f} / {o['uis']:.3f} | {s['change_mia_auc']['mean']:+.3f} ± "
                     f"{s['change_mia_auc']['se']:.3f} | {s['change_uis']['mean']:+.3f} ± {s['change_uis']['se']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("test_split", help="bench JSON without --reference-scenes")
    p.add_argument("own_reference", help="bench JSON of the same runs with --reference-scenes N")
    p.add_argument("--out", default=None, help="summary JSON (the table is printed)")
    args = p.parse_args(argv)
    docs = [json.loads(Path(x).read_text()) for x in (args.test_split, args.own_reference)]
    if "reference_scenes" in docs[0]["config"] or "reference_scenes" not in docs[1]["config"]:
        raise SystemExit("the first document must be a run without --reference-scenes, the second one with it")
    summary = compare(*docs)
    table = markdown(summary)
    print(table, end="")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": "python benchmarks/reference_split.py " + " ".join(shlex.quote(a) for a in argv),
            "reference_scenes": docs[1]["config"]["reference_scenes"], "device": docs[0]["device"],
            "groups": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
