"""The measurement scripts in benchmarks/ still start, and the analysis scripts still
reproduce the committed figures from the committed JSON files.

Nothing else runs these scripts, and benchmarks/README.md quotes their commands: a
script broken by an engine change (an import moved, an option refused) would only
show on the next GPU session or when someone reruns a documented command. Every
script is run as the README runs it (``python benchmarks/<script>.py``, the repository
on PYTHONPATH) in a subprocess; the ``--help`` calls run a few at a time, since each
imports torch (~2 s)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))


def run_script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(SCRIPTS, pool.map(lambda name: run_script(name, "--help"), SCRIPTS)))


def test_the_scripts_are_found():
    assert "tune_interference_aware.py" in SCRIPTS and "job_timing.py" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_answers_help(helps, name):
    done = helps[name]
    assert done.returncode == 0, f"{name} --help: exit {done.returncode}\n{done.stderr[-2000:]}"
    assert "usage:" in done.stdout


def without_command(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "command"}


def test_compare_variants_reproduces_the_committed_comparison(tmp_path):
    out = tmp_path / "compare.json"
    done = run_script("compare_variants.py", "benchmarks/refresh_subset/indoor.json",
                      "benchmarks/refresh_subset/street.json", "--reference", "default", "--out", str(out))
    assert done.returncode == 0, done.stderr
    committed = json.loads((BENCH / "refresh_subset" / "compare.json").read_text())
    assert without_command(json.loads(out.read_text())) == without_command(committed)


def test_seed_spread_reproduces_the_committed_spread(tmp_path):
    out = tmp_path / "spread.json"
    done = run_script("seed_spread.py", "benchmarks/mia_seeds/smoke_8seeds.json", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == json.loads((BENCH / "mia_seeds" / "spread_all.json").read_text())
    assert "| indoor | full | interference_aware |" in done.stdout


def test_sweep_baselines_table_of_the_committed_sweep():
    done = run_script("sweep_baselines.py", "--table", "--out", "benchmarks/sweep_baselines.json")
    assert done.returncode == 0, done.stderr
    methods = json.loads((BENCH / "sweep_baselines.json").read_text())["methods"]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| method | chosen setting |")
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[4:]] == list(methods)


def load_script(name: str):
    """A script of benchmarks/ as a module, imported as `python benchmarks/<name>` runs it: with
    its folder on the path, for the scripts that import a sibling."""
    import importlib.util

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), BENCH / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_row(method, uis, mia, *, n=8, seed=0, setting="full", retrain=0.45, original=0.9):
    return {"benchmark": "indoor", "setting": setting, "forget_tasks": ["segmentation"], "n_forget": n, "seed": seed,
            "method": method, "uis": uis, "uis_task": 0.0, "uis_inst": uis, "mia_auc": mia,
            "mia_auc_original": original, "mia_auc_retrain": retrain, "forget_gap": 0.0, "seconds": 1.0,
            "retrain_seconds": 10.0}


def test_matched_forgetting_picks_the_lowest_uis_point_that_forgets_as_well():
    mf = load_script("matched_forgetting.py")
    assert mf.grid_points({"lr": [1, 2], "steps": [3]}) == [{"lr": 1, "steps": 3}, {"lr": 2, "steps": 3}]
    ours = [bench_row("interference_aware", 0.3, 0.40), bench_row("interference_aware", 0.1, 0.50, seed=1)]
    default = [bench_row("finetune", 0.2, 0.60), bench_row("finetune", 0.2, 0.60, seed=1)]  # |ΔMIA| 0.15
    points = [  # ours: |ΔMIA| (0.05 + 0.05) / 2 = 0.05, UIS 0.2
        {"label": "finetune[a]", "results": [bench_row("finetune", 1.0, 0.47), bench_row("finetune", 1.0, 0.43, seed=1)]},
        {"label": "finetune[b]", "results": [bench_row("finetune", 0.5, 0.49), bench_row("finetune", 0.3, 0.46, seed=1)]},
        {"label": "finetune[c]", "results": [bench_row("finetune", 0.1, 0.55), bench_row("finetune", 0.1, 0.55, seed=1)]},
    ]
    [t] = mf.summarise(ours + default, "finetune", points)
    assert t["ours"]["uis"] == pytest.approx(0.2) and t["ours"]["mia_err"] == pytest.approx(0.05)
    assert t["strongest"] == "finetune[b]"  # [a] forgets better but costs more; [c] and the default forget less
    assert t["strongest_uis"] == pytest.approx(0.4) and t["reduction"] == pytest.approx(50.0)
    assert t["closest"] == "finetune[a]" and t["closest_mia_err"] == pytest.approx(0.02)
    assert set(t["points"]) == {"finetune[default]", "finetune[a]", "finetune[b]", "finetune[c]"}
    [none] = mf.summarise(ours + default, "finetune", points[2:])
    assert none["strongest"] is None and none["reduction"] is None
    assert "| indoor | full | 0.20 | 0.050 | none |" in mf.markdown(
        {"method": "finetune", "command": "c", "reference": "r", "device": "d", "wall_seconds": 1.0, "table": [none]})


def test_matched_forgetting_runs_the_requests_a_piece_ran(monkeypatch, tmp_path):
    """A reference that is a piece (--benchmarks indoor) records the suite's benchmarks in its
    config: every grid point ran street too, then stopped ("not in the reference")."""
    mf = load_script("matched_forgetting.py")
    rows = [bench_row("interference_aware", 1.0, 0.5, seed=s, setting=st, n=n)
            for s, st, n in ((0, "full", 8), (1, "full", 8), (0, "partial", 8))]
    rows[2]["forget_tasks"] = ["depth"]
    reference = {"suite": "smoke", "config": {"benchmarks": {"indoor": {}, "street": {}}, "seeds": [0, 1]},
                 "results": rows + [bench_row("finetune", 1.0, 0.5)]}
    assert mf.reference_runs(reference) == {"indoor": (["full:8", "partial:depth"], [0, 1])}
    calls = []

    def fake_bench(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        # the bench runs every seed of every setting asked: partial:depth on seed 1 is not a reference request
        out.write_text(json.dumps({"results": [{**r, "method": "finetune"} for r in rows]
                                   + [{**rows[2], "seed": 1, "method": "finetune"}]}))

    monkeypatch.setattr(mf, "bench_main", fake_bench)
    got = mf.run_point(reference, "finetune", {"steps": 2}, str(tmp_path / "cache"), tmp_path)
    (argv,) = calls
    assert argv[argv.index("--benchmarks") + 1:argv.index("--settings")] == ["indoor"]
    assert argv[argv.index("--settings") + 1:argv.index("--seeds")] == ["full:8", "partial:depth"]
    assert sorted((r["setting"], r["seed"]) for r in got) == [("full", 0), ("full", 1), ("partial", 0)]


def test_matched_forgetting_refuses_runs_on_other_models():
    mf = load_script("matched_forgetting.py")
    reference = [bench_row("interference_aware", 0.2, 0.4)]
    mf.check_same_models([bench_row("finetune", 1.0, 0.5)], reference, "p")
    with pytest.raises(ValueError, match="mia_auc_retrain 0.5 differs from the reference's 0.45"):
        mf.check_same_models([bench_row("finetune", 1.0, 0.5, retrain=0.5)], reference, "p")
    with pytest.raises(ValueError, match="is not in the reference"):
        mf.check_same_models([bench_row("finetune", 1.0, 0.5, seed=3)], reference, "p")


@pytest.mark.parametrize("name", ["finetune", "finetune_scale"])
def test_matched_forgetting_table_of_the_committed_runs(name):
    done = run_script("matched_forgetting.py", "--table", f"benchmarks/matched_forgetting/{name}.json")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (BENCH / "matched_forgetting" / f"{name}.md").read_text()


@pytest.mark.parametrize("grid", ['{"nope": {"lr": [1]}}', '{"ssd": {"alpha": 1}}', '{"ssd": 3}'])
def test_sweep_baselines_refuses_a_grid_it_cannot_run_before_any_work(grid):
    done = run_script("sweep_baselines.py", "--grid", grid, "--out", "/nonexistent/x.json")
    assert done.returncode == 2 and "--grid:" in done.stderr and "must be a baseline of GRID" in done.stderr


def test_sweep_baselines_merge_refuses_other_seeds_before_any_work(tmp_path):
    """--merge with a subset of the file's seeds re-chose every other method from that subset
    (finetune's default from one seed); a seed the file lacks was a KeyError after the runs."""
    sweep = tmp_path / "sweep.json"
    sweep.write_text((BENCH / "sweep_baselines.json").read_text())
    for seeds in (["0"], ["0", "1", "2", "3"]):
        done = run_script("sweep_baselines.py", "--merge", "--methods", "ssd", "--seeds", *seeds, "--out", str(sweep))
        assert done.returncode == 2 and "holds seeds [0, 1, 2]" in done.stderr and "give --seeds 0 1 2" in done.stderr
    assert sweep.read_text() == (BENCH / "sweep_baselines.json").read_text()


def test_sweep_baselines_never_chooses_a_point_that_diverged_on_a_seed():
    sb = load_script("sweep_baselines.py")
    good = {"uis": 5.0, "mia_auc": 0.40, "mia_auc_retrain": 0.40}
    diverged = {"uis": float("nan"), "mia_auc": None, "mia_auc_retrain": 0.40}
    mixed = sb.summarise([good, good, diverged])
    assert mixed["uis"] is None and mixed["mia_auc"] is None  # not the mean of its good seeds
    ok = {"config": {"lr": 1}, "full": {**good, "uis": 9.0}, "partial": {**good, "uis": 9.0}}
    bad = {"config": {"lr": 2}, "full": mixed, "partial": mixed}
    assert sb.choose([bad, ok]) == {"config": {"lr": 1}, "forgets": True, "mia_gap": 0.0, "mean_uis": 9.0}


def _ref_run(seed, task, mia, retrain, uis, n=8):
    return {"benchmark": "indoor", "setting": "partial", "forget_tasks": [task], "n_forget": n, "seed": seed,
            "method": "interference_aware", "mia_auc": mia, "mia_auc_retrain": retrain, "mia_auc_original": 0.9,
            "uis": uis}


def test_reference_split_pairs_runs_on_the_same_forget_sets(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("reference_split", BENCH / "reference_split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = {"device": "cpu", "config": {}, "results": [
        _ref_run(0, "depth", 0.60, 0.62, 0.2), _ref_run(1, "depth", 0.70, 0.66, 0.4),
        _ref_run(0, "depth", 0.10, 0.62, 9.0, n=1)]}  # one instance: a rank, left out
    own = {"device": "cpu", "config": {"reference_scenes": 48}, "results": [
        _ref_run(0, "depth", 0.55, 0.62, 0.3), _ref_run(1, "depth", 0.60, 0.66, 0.4),
        _ref_run(2, "depth", 0.10, 0.50, 0.1)]}  # not in the other document: not paired
    (group,) = module.compare(base, own).values()
    assert group["sets"] == 2
    assert group["test_split"]["d"]["mean"] == pytest.approx(0.01) and group["test_split"]["mean_abs_d"] == 0.03
    assert group["own_reference"]["d"]["mean"] == pytest.approx(-0.065)
    assert group["change_mia_auc"]["mean"] == pytest.approx(-0.075) and group["change_uis"]["mean"] == 0.05
    # another gold standard (other models, another test split): no pairing
    other = {**own, "results": [_ref_run(0, "depth", 0.55, 0.70, 0.3)]}
    with pytest.raises(SystemExit, match="not a paired comparison"):
        module.compare(base, other)
    for name, doc in (("a.json", base), ("b.json", own)):
        (tmp_path / name).write_text(json.dumps(doc))
    done = run_script("reference_split.py", str(tmp_path / "b.json"), str(tmp_path / "a.json"))
    assert done.returncode != 0 and "must be a run without --reference-scenes" in done.stderr
    done = run_script("reference_split.py", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                      "--out", str(tmp_path / "s.json"))
    assert done.returncode == 0, done.stderr
    assert "| indoor · partial | 2 |" in done.stdout
    assert json.loads((tmp_path / "s.json").read_text())["reference_scenes"] == 48


@pytest.mark.parametrize("n", [48, 192])
def test_reference_split_reproduces_the_committed_summary(tmp_path, n):
    out = tmp_path / "summary.json"
    done = run_script("reference_split.py", "benchmarks/mia_seeds/smoke_8seeds.json",
                      f"benchmarks/reference_split/reference{n}.json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    committed = json.loads((BENCH / "reference_split" / f"summary{n}.json").read_text())
    assert without_command(json.loads(out.read_text())) == without_command(committed)


def test_strongest_by_size_reproduces_the_committed_table_and_the_summarys_pooled_choice(tmp_path):
    from unlearning.bench import headline

    out = tmp_path / "strongest.json"
    done = run_script("strongest_by_size.py", "benchmarks/smoke.json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    assert without_command(written) == without_command(json.loads((BENCH / "strongest_by_size.json").read_text()))
    # its pooled reading is the summary's own choice
    rows = headline(json.loads((BENCH / "smoke.json").read_text())["results"])
    summary = {(h["benchmark"], h["setting"]): h for h in rows}
    for entry in written["table"]:
        h = summary[(entry["benchmark"], entry["setting"])]
        assert (entry["pooled"]["strongest"] or "none") == (h.get("strongest") or "none"), h


def test_same_rows_reproduces_the_committed_check_and_finds_a_changed_figure(tmp_path):
    out = tmp_path / "same.json"
    done = run_script("same_rows.py", "benchmarks/no_step_check/smoke_interference_aware.json",
                      "benchmarks/smoke_before_retune/smoke.json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == json.loads((BENCH / "no_step_check" / "same_rows.json").read_text())
    doc = json.loads((BENCH / "no_step_check" / "smoke_interference_aware.json").read_text())
    doc["results"][3]["uis"] += 1e-12
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(doc))
    done = run_script("same_rows.py", str(changed), "benchmarks/smoke_before_retune/smoke.json")
    assert done.returncode == 1 and "17 of 18 rows the same; 1 differ" in done.stdout
