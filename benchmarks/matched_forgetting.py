"""Can a baseline forget as well as interference_aware, and at what UIS?

The headline's *strongest baseline* (design §3) is the lowest-UIS baseline whose
forgetting is at least as good as ours: pooled over a setting's runs, a mean
``|mia_auc - mia_auc_retrain|`` no larger than ours. Each baseline runs at its
swept default (docs/baselines.md), chosen on a small world with a tolerance of
0.15 in the MIA AUC; when none of them forgets as well as ours, the headline says
``none`` and leaves open whether one *could*, at another setting, and at what
UIS. This script answers that for one baseline: it runs the baseline over a
grid of hyper-parameters on the suite, trained models and forget sets of a
reference results document (``--reference``, e.g. the committed ``smoke.json``,
with the cache of trained models it was made with), pools every grid point per
benchmark and setting exactly as the headline does (:func:`unlearning.bench.headline`),
and reports the lowest-UIS grid point that forgets at least as well as ours.

Every run must see the reference's models: the script checks that each run's
``mia_auc_original`` and ``mia_auc_retrain`` equal the reference's for the same
request, and stops when one does not (another CPU trains other models from the
same seeds: benchmarks/README.md, "Two CPUs").

    python benchmarks/matched_forgetting.py --reference benchmarks/smoke.json --cache-dir .cache/bench-cold \\
        --method finetune --grid '{"lr": [0.005, 0.01], "steps": [120, 200]}' \\
        --out benchmarks/matched_forgetting/finetune.json

writes the JSON and a markdown table next to it (``.md``); ``--table <that JSON>`` prints
the table again from the runs the JSON keeps.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from unlearning.bench import DEFAULT_METHOD, aggregate, headline, setting_label
from unlearning.bench import main as bench_main
from unlearning.methods import method_defaults

from sweep_baselines import grid_points  # noqa: E402  this folder's script (run as python benchmarks/matched_forgetting.py)

REQUEST = ("benchmark", "setting", "forget_tasks", "n_forget", "seed")


def label(method: str, config: dict) -> str:
    """``finetune[lr=0.01,steps=200]``: a grid point's name in the tables."""
    return f"{method}[{','.join(f'{k}={v}' for k, v in config.items())}]"


def request_key(row: dict) -> tuple:
    return tuple(tuple(row[k]) if isinstance(row[k], list) else row[k] for k in REQUEST)


def check_same_models(rows: list[dict], reference: list[dict], what: str) -> None:
    """ValueError unless every run's original and gold-standard MIA AUCs are the reference's
    for the same request (the same trained models), and every run has a reference request."""
    ref = {request_key(r): r for r in reference if r["method"] == DEFAULT_METHOD}
    for r in rows:
        other = ref.get(request_key(r))
        if other is None:
            raise ValueError(f"{what}: request {request_key(r)} is not in the reference")
        for field in ("mia_auc_original", "mia_auc_retrain"):
            if r[field] != other[field]:
                raise ValueError(f"{what}: {field} {r[field]} differs from the reference's {other[field]} on "
                                 f"{request_key(r)}: these runs trained other models than the reference's")


def reference_runs(reference: dict) -> dict[str, tuple[list[str], list[int]]]:
    """``{benchmark: (settings, seeds)}`` that ours ran in the reference, from its rows: a
    reference that is a piece (``--benchmarks``, ``--settings``, ``--seeds``) records its
    suite's benchmarks in its config, not the ones it ran."""
    out: dict[str, tuple[list[str], list[int]]] = {}
    for r in reference["results"]:
        if r["method"] == DEFAULT_METHOD:
            labels, seeds = out.setdefault(r["benchmark"], ([], []))
            for value, into in ((setting_label(r), labels), (r["seed"], seeds)):
                if value not in into:
                    into.append(value)
    return out


def run_point(reference: dict, method: str, config: dict, cache_dir: str, scratch: Path) -> list[dict]:
    """One grid point on the reference's requests (its suite; per benchmark, the settings and
    seeds ours ran there): its result rows, of those requests only."""
    cfg_path = scratch / "config.json"
    cfg_path.write_text(json.dumps({method: config}))
    out = scratch / "point.json"
    wanted = {request_key(r) for r in reference["results"] if r["method"] == DEFAULT_METHOD}
    rows = []
    for benchmark, (labels, seeds) in reference_runs(reference).items():
        argv = ["--suite", reference["suite"], "--out", str(out), "--methods", method, "--method-config",
                str(cfg_path), "--no-independent-retrain", "--no-progress", "--cache-dir", cache_dir,
                "--benchmarks", benchmark, "--settings", *labels, "--seeds", *map(str, sorted(seeds))]
        with contextlib.redirect_stdout(io.StringIO()):
            bench_main(argv)
        # a seed that ran another setting only (a merge of pieces): not a request of the reference
        rows += [r for r in json.loads(out.read_text())["results"] if request_key(r) in wanted]
    return rows


def reference_rows(reference: dict, method: str) -> list[dict]:
    """The reference's rows of ours and of ``method`` at its default (kept in the output, so
    ``--table`` needs nothing else)."""
    return [r for r in reference["results"] if r["method"] in (DEFAULT_METHOD, method)]


def summarise(rows: list[dict], method: str, points: list[dict]) -> list[dict]:
    """Per benchmark and setting: ours, the method's default (``rows``: :func:`reference_rows`),
    every grid point (pooled as the headline pools), and the strongest point: the lowest UIS
    among those whose |ΔMIA| is no larger than ours (None when none forgets as well)."""
    ours = [r for r in rows if r["method"] == DEFAULT_METHOD]
    default = [{**r, "method": f"{method}[default]"} for r in rows if r["method"] == method]
    grid_rows = [{**r, "method": p["label"]} for p in points for r in p["results"]]
    runs = ours + default + grid_rows
    pooled = aggregate([{**r, "n_forget": 0} for r in runs])  # as headline pools: every forget size of a setting
    table = []
    for h in headline(runs):
        agg = pooled[(h["benchmark"], h["setting"], 0)]
        table.append({
            "benchmark": h["benchmark"], "setting": h["setting"],
            "ours": {"uis": agg[DEFAULT_METHOD]["uis"], "mia_err": agg[DEFAULT_METHOD]["mia_err"]},
            "points": {m: {"uis": v["uis"], "mia_err": v["mia_err"], "seconds": v["seconds"]}
                       for m, v in agg.items() if m != DEFAULT_METHOD},
            "strongest": h["strongest"], "strongest_uis": h["strongest_uis"], "reduction": h["reduction"],
            "closest": h["closest_baseline"], "closest_mia_err": h["closest_mia_err"], "closest_uis": h["closest_uis"],
            "reduction_vs_closest": h["reduction_vs_closest"],
        })
    return table


def _f(x, nd=2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def markdown(doc: dict) -> str:
    lines = [f"# Matched forgetting: `{doc['method']}` against `{DEFAULT_METHOD}`", "",
             f"Command: `{doc['command']}`  ", f"Reference: `{doc['reference']}` ({doc['device']})  ",
             f"Wall time: {doc['wall_seconds']:.0f} s", "",
             "Pooled per benchmark and setting as the headline pools (full: 1 and 8 instances; partial: every task; "
             "means over seeds). |ΔMIA| = mean |mia_auc − mia_auc_retrain|. *Strongest*: the lowest UIS among the "
             "points whose |ΔMIA| is no larger than ours (`none`: no point forgets as well).", "",
             "| benchmark | setting | UIS ours | \\|ΔMIA\\| ours | strongest point | its UIS | UIS reduction | "
             "closest-forgetting point | its \\|ΔMIA\\| | its UIS | reduction |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in doc["table"]:
        red = "–" if t["reduction"] is None else f"{t['reduction']:.1f}%"
        red_c = "–" if t["reduction_vs_closest"] is None else f"{t['reduction_vs_closest']:.1f}%"
        lines.append(f"| {t['benchmark']} | {t['setting']} | {_f(t['ours']['uis'])} | {_f(t['ours']['mia_err'], 3)} | "
                     f"{t['strongest'] or 'none'} | {_f(t['strongest_uis'])} | {red} | {t['closest']} | "
                     f"{_f(t['closest_mia_err'], 3)} | {_f(t['closest_uis'])} | {red_c} |")
    lines += ["", "## Every point", ""]
    for t in doc["table"]:
        lines += [f"### {t['benchmark']} · {t['setting']}", "", "| point | UIS | \\|ΔMIA\\| | seconds |", "|---|---|---|---|",
                  f"| {DEFAULT_METHOD} (ours) | {_f(t['ours']['uis'])} | {_f(t['ours']['mia_err'], 3)} | |"]
        for m, v in sorted(t["points"].items(), key=lambda kv: kv[1]["mia_err"]):
            lines.append(f"| {m} | {_f(v['uis'])} | {_f(v['mia_err'], 3)} | {_f(v['seconds'], 1)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", help="results JSON of unlearning.bench with interference_aware rows")
    p.add_argument("--cache-dir", help="the cache of trained models the reference was made with")
    p.add_argument("--method", help="the baseline to run over the grid")
    p.add_argument("--grid", help="JSON {hyper-parameter: [values]}; the product is run")
    p.add_argument("--out", help="results JSON (the .md is written next to it)")
    p.add_argument("--table", metavar="JSON", help="run nothing: print the markdown of an earlier run's JSON, "
                                                   "its table recomputed from its runs")
    args = p.parse_args(argv)
    if args.table:
        doc = json.loads(Path(args.table).read_text())
        doc["table"] = summarise(doc["reference_rows"], doc["method"], doc["points"])
        print(markdown(doc))
        return 0
    missing = [f"--{k.replace('_', '-')}" for k in ("reference", "cache_dir", "method", "grid", "out")
               if getattr(args, k) is None]
    if missing:
        p.error(f"a run needs {', '.join(missing)}")
    reference = json.loads(Path(args.reference).read_text())
    if args.method in (DEFAULT_METHOD, "retrain"):
        raise SystemExit(f"--method must be a baseline, not {args.method}")
    grid = json.loads(args.grid)
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        p.error(f"--grid must be a JSON object of non-empty lists, got {args.grid}")
    points = [{"config": c, "label": label(args.method, c)} for c in grid_points(grid)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for i, point in enumerate(points, 1):
            t0 = time.perf_counter()
            point["results"] = run_point(reference, args.method, point["config"], args.cache_dir, Path(scratch))
            check_same_models(point["results"], reference["results"], point["label"])
            print(f"[{i}/{len(points)}] {point['label']}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    doc = {"command": "python benchmarks/matched_forgetting.py " + " ".join(shlex.quote(a) for a in argv),
           "reference": args.reference, "device": reference["device"], "method": args.method,
           "defaults": method_defaults(args.method), "grid": grid,
           "wall_seconds": round(time.perf_counter() - start, 1),
           "reference_rows": reference_rows(reference, args.method), "points": points}
    doc["table"] = summarise(doc["reference_rows"], args.method, points)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(doc) + "\n")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
