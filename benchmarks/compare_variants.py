"""Paired comparison of interference_aware variants on the same forget sets, from the
records ``tune_interference_aware.py`` writes: per variant and setting, the mean UIS,
the mean |MIA AUC − the retrained model's| over forget sets of 8 (the issue's target,
here per set, not of the mean) and how far each run is from the reference variant's run
on the same forget set (mean |Δ UIS|, mean |Δ MIA AUC|, largest |Δ MIA AUC|).

    python benchmarks/compare_variants.py benchmarks/refresh_subset/indoor.json \\
        benchmarks/refresh_subset/street.json --reference default \\
        --out benchmarks/refresh_subset/compare.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from statistics import mean


def _key(run: dict) -> tuple:
    return (run["benchmark"], run["setting"], "/".join(run["forget_tasks"]), run["n_forget"], run["seed"])


def compare(records: list[dict], reference: str) -> dict:
    """``{variant: {"benchmark/setting": summary}}`` for every variant with runs on the
    reference's forget sets (settings pooled as the bench does: full 1 and 8, partial
    every task)."""
    runs: dict[str, dict[tuple, dict]] = {}
    for rec in records:
        for run in rec["runs"]:
            runs.setdefault(rec["variant"], {})[_key(run)] = run
    if reference not in runs:
        raise SystemExit(f"no records of the reference variant {reference!r}; variants: {sorted(runs)}")
    ref = runs[reference]
    out: dict[str, dict] = {}
    for variant, by_key in runs.items():
        groups: dict[str, list[tuple[dict, dict]]] = {}
        for key, run in by_key.items():
            if key in ref:
                groups.setdefault(f"{key[0]}/{key[1]}", []).append((run, ref[key]))
        out[variant] = {}
        for group, pairs in sorted(groups.items()):
            eight = [(r, q) for r, q in pairs if r["n_forget"] == 8 and r["mia_auc"] is not None]
            out[variant][group] = {
                "runs": len(pairs),
                "uis": round(mean(r["uis"] for r, _ in pairs), 4),
                "mia_err_n8": round(mean(abs(r["mia_auc"] - r["mia_auc_retrain"]) for r, _ in eight), 4) if eight else None,
                "mean_d_n8": round(mean(r["mia_auc"] - r["mia_auc_retrain"] for r, _ in eight), 4) if eight else None,
                "abs_delta_uis_vs_reference": round(mean(abs(r["uis"] - q["uis"]) for r, q in pairs), 4),
                "abs_delta_mia_vs_reference_n8": round(mean(abs(r["mia_auc"] - q["mia_auc"]) for r, q in eight), 4)
                if eight else None,
                "max_abs_delta_mia_vs_reference_n8": round(max(abs(r["mia_auc"] - q["mia_auc"]) for r, q in eight), 4)
                if eight else None,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="+", help="tune_interference_aware.py record files")
    p.add_argument("--reference", default="default")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    records = [rec for f in args.records for rec in json.loads(Path(f).read_text())["records"]]
    table = compare(records, args.reference)
    for variant, groups in table.items():
        for group, s in groups.items():
            print(f"{variant:28s} {group:16s} UIS {s['uis']:.3f}  |ΔMIA| n=8 {s['mia_err_n8']}  "
                  f"vs {args.reference}: |ΔUIS| {s['abs_delta_uis_vs_reference']}, "
                  f"|ΔMIA| {s['abs_delta_mia_vs_reference_n8']} (max {s['max_abs_delta_mia_vs_reference_n8']})")
    if args.out:
        doc = {"command": "python benchmarks/compare_variants.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
               "reference": args.reference, "devices": sorted({r["device"] for r in records}), "variants": table}
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
