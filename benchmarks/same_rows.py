"""Whether two benchmark result files agree, row for row, on every figure.

    python benchmarks/same_rows.py NEW.json benchmarks/smoke.json --out RESULT.json

Each row of NEW is matched with the row of the reference of the same benchmark, setting,
forgotten tasks, forget size, seed and method; ``uis``, ``uis_task``, ``uis_inst``,
``mia_auc``, ``mia_auc_original``, ``mia_auc_retrain`` and ``forget_gap`` must be equal
(bit for bit: a change that should move no figure). Seconds are not compared. Writes the
counts and every difference; exits 1 when a row differs or has no match."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FIGURES = ("uis", "uis_task", "uis_inst", "mia_auc", "mia_auc_original", "mia_auc_retrain", "forget_gap")


def key(row: dict) -> tuple:
    return row["benchmark"], row["setting"], tuple(row["forget_tasks"]), row["n_forget"], row["seed"], row["method"]


def compare(new: list[dict], reference: list[dict]) -> dict:
    by_key = {key(r): r for r in reference}
    same, differ, unmatched = 0, [], []
    for row in new:
        ref = by_key.get(key(row))
        if ref is None:
            unmatched.append(list(key(row)))
            continue
        changed = {f: [ref[f], row[f]] for f in FIGURES if ref[f] != row[f]}
        if changed:
            differ.append({"row": list(key(row)), "reference_then_new": changed})
        else:
            same += 1
    return {"rows": len(new), "same": same, "differ": differ, "unmatched": unmatched}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("new")
    p.add_argument("reference")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = {"new": args.new, "reference": args.reference,
              **compare(json.loads(Path(args.new).read_text())["results"],
                        json.loads(Path(args.reference).read_text())["results"])}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(f"{result['same']} of {result['rows']} rows the same; {len(result['differ'])} differ, "
          f"{len(result['unmatched'])} without a match")
    return 0 if result["same"] == result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
